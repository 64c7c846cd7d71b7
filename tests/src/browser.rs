//! A real headless Chromium for a test, driven over WebDriver by chromedriver on a free
//! loopback port; both stop when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

const INSTALL_HINT: &str = "chromium and chromedriver are not installed: the dashboard tests \
     drive a real headless browser.\nInstall them with:  sudo apt-get install -y chromium \
     chromium-driver   (or run ./.ci/run, which does)";

/// How long a page may take to show what a test waits for: the browser shares two cores with
/// every other test.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// chromedriver and one headless Chromium session.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, 1280×900.
    pub async fn start() -> Browser {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run chromedriver ({e}).\n{INSTALL_HINT}"));
        let profile = tempfile::tempdir().expect("a temporary folder");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium_binary(),
                "args": [
                    "--headless=new",
                    // Tests run as root in CI containers, where the sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        // chromedriver takes a moment to listen: wait until it accepts a connection.
        let listening = tokio::time::timeout(PATIENCE, async {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            listening.is_ok(),
            "chromedriver never listened.\n{INSTALL_HINT}"
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("no WebDriver session: {e}\n{INSTALL_HINT}"));
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Waits for the element `css`.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// Waits until the element `css` holds `text`.
    pub async fn find_text(&self, css: &str, text: &str) -> fantoccini::elements::Element {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Ok(elements) = self.client.find_all(Locator::Css(css)).await {
                    for element in elements {
                        if element.text().await.is_ok_and(|t| t.contains(text)) {
                            return element;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {css} holding {text:?} after {PATIENCE:?}"))
    }

    /// Types `text` into the (emptied) field `css`.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("the field clears");
        field.send_keys(text).await.expect("the field takes keys");
    }

    /// Clicks the element `css`.
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("a click");
    }

    /// Saves a PNG of the page as `name` in target/screenshots, and in docs/img when
    /// `WEIR_UPDATE_SCREENSHOTS` is set.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut folders = vec![root.join("target/screenshots")];
        if std::env::var_os("WEIR_UPDATE_SCREENSHOTS").is_some() {
            folders.push(root.join("docs/img"));
        }
        for folder in folders {
            std::fs::create_dir_all(&folder).expect("a screenshot folder");
            std::fs::write(folder.join(format!("{name}.png")), &png).expect("a screenshot");
        }
    }

    /// Ends the session and stops chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// Debian's Chromium, where it installs it.
fn chromium_binary() -> String {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("{INSTALL_HINT}");
}
