//! ip-restriction: lets through or refuses clients by CIDR allow and deny lists.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, schemars};

/// `{"allow": [CIDR..]}`, `{"deny": [CIDR..]}`, or both (deny is checked first).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    deny: Vec<String>,
    /// The status a refused client gets: 403 by default.
    #[serde(default = "default_status")]
    status: u16,
    /// The error message a refused client gets.
    #[serde(default = "default_message")]
    message: String,
}

fn default_status() -> u16 {
    403
}

fn default_message() -> String {
    "your IP address is not allowed".into()
}

/// Parses `10.0.0.0/8`, or a bare address as a single-host network.
fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an IP address or CIDR"))
}

struct IpRestriction {
    allow: Option<Vec<IpNet>>,
    deny: Vec<IpNet>,
    status: u16,
    message: String,
}

impl IpRestriction {
    fn permits(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        match &self.allow {
            Some(allow) => allow.iter().any(|net| net.contains(&ip)),
            None => true,
        }
    }
}

impl Plugin for IpRestriction {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.allow.is_none() && config.deny.is_empty() {
            return Err("set `allow` or `deny` (a list of CIDRs)".into());
        }
        if !(400..=599).contains(&config.status) {
            return Err(format!("status {} is not a 4xx or 5xx code", config.status));
        }
        let allow = match config.allow {
            Some(list) => Some(
                list.iter()
                    .map(|n| parse_net(n))
                    .collect::<Result<_, _>>()?,
            ),
            None => None,
        };
        let deny = config
            .deny
            .iter()
            .map(|n| parse_net(n))
            .collect::<Result<_, _>>()?;
        Ok(IpRestriction {
            allow,
            deny,
            status: config.status,
            message: config.message,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let permitted = req
            .client_ip()
            .parse::<IpAddr>()
            .map(|ip| self.permits(ip))
            .unwrap_or(false);
        if permitted {
            Action::Continue
        } else {
            Action::Respond(Reply::error(self.status, &self.message))
        }
    }
}

weir_sdk::export_plugin!(IpRestriction);
