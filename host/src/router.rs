//! The route table: maps a request's path, method and host to a route.
//!
//! Paths live in a segment trie, so lookup cost depends on the path's depth, not on the number
//! of routes. At each segment a literal child is tried before a `{param}` child, and both before
//! a prefix route (`/a/*`) ending at that node; when every route at the most specific match is
//! filtered out by method or host, the search backtracks to the next most specific one.
//! (matchit was the first choice, but it refuses `/users/*` next to `/users/{id}`, and it cannot
//! backtrack past a filtered-out match.)

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;

/// What a route matches besides its path.
#[derive(Clone, Debug, Default)]
pub struct RouteFilter {
    /// Allowed methods; empty means any.
    pub methods: Vec<Method>,
    /// Allowed hosts: `api.example.com`, or `*.example.com` for any subdomain; empty means any.
    pub hosts: Vec<String>,
    /// Higher wins among routes on the same path.
    pub priority: i32,
}

impl RouteFilter {
    fn accepts(&self, method: &Method, host: Option<&str>) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.hosts.is_empty()
                || host.is_some_and(|h| self.hosts.iter().any(|p| host_matches(p, h))))
    }
}

/// `pattern` is lower-case; `host` may be in any case (host names are case-insensitive).
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            let Some(split) = host.len().checked_sub(suffix.len() + 1) else {
                return false;
            };
            split > 0
                && host.as_bytes()[split] == b'.'
                && host.is_char_boundary(split + 1)
                && host[split + 1..].eq_ignore_ascii_case(suffix)
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// A successful lookup.
#[derive(Debug)]
pub struct RouteMatch<'a, T> {
    /// The route's value.
    pub route: &'a Arc<T>,
    /// The matched pattern's literal prefix: `/api` for `/api/*`, `/users` for `/users/{id}`.
    pub prefix: &'a str,
}

struct Candidate<T> {
    route: Arc<T>,
    filter: Arc<RouteFilter>,
    prefix: Arc<str>,
    order: (i32, bool, bool, usize),
}

struct Node<T> {
    literals: HashMap<Box<str>, Node<T>>,
    param: Option<Box<Node<T>>>,
    /// Routes whose pattern ends exactly here.
    exact: Vec<Candidate<T>>,
    /// Prefix routes (`.../*`) whose base ends here; they match here and everything below.
    prefix: Vec<Candidate<T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literals: HashMap::new(),
            param: None,
            exact: Vec::new(),
            prefix: Vec::new(),
        }
    }
}

/// An immutable table of routes, built once per config snapshot.
pub struct RouteTable<T> {
    root: Node<T>,
    len: usize,
}

/// Builds a [`RouteTable`].
pub struct RouteTableBuilder<T> {
    root: Node<T>,
    len: usize,
}

/// The segments of a pattern, whether it is a prefix, and its literal prefix.
fn parse_pattern(pattern: &str) -> (Vec<&str>, bool, String) {
    let (body, is_prefix) = match pattern.strip_suffix("/*") {
        Some(body) => (body, true),
        None => (pattern, false),
    };
    let segments: Vec<&str> = if is_prefix && body.is_empty() {
        Vec::new()
    } else {
        body.strip_prefix('/').unwrap_or(body).split('/').collect()
    };
    let mut literal_prefix = String::new();
    for segment in &segments {
        if segment.starts_with('{') {
            break;
        }
        literal_prefix.push('/');
        literal_prefix.push_str(segment);
    }
    let literal_prefix = literal_prefix.trim_end_matches('/').to_string();
    (segments, is_prefix, literal_prefix)
}

impl<T> RouteTableBuilder<T> {
    /// Adds `route` under each of its path patterns; `index` breaks ties (lower first).
    pub fn add(&mut self, patterns: &[&str], filter: RouteFilter, route: Arc<T>, index: usize) {
        let filter = Arc::new(filter);
        let order = (
            -filter.priority,
            filter.hosts.is_empty(),
            filter.methods.is_empty(),
            index,
        );
        for pattern in patterns {
            let (segments, is_prefix, literal_prefix) = parse_pattern(pattern);
            let mut node = &mut self.root;
            for segment in segments {
                node = if segment.starts_with('{') {
                    node.param.get_or_insert_with(Default::default)
                } else {
                    node.literals.entry(segment.into()).or_default()
                };
            }
            let candidate = Candidate {
                route: route.clone(),
                filter: filter.clone(),
                prefix: literal_prefix.into(),
                order,
            };
            if is_prefix {
                &mut node.prefix
            } else {
                &mut node.exact
            }
            .push(candidate);
        }
        self.len += 1;
    }

    /// Builds the table.
    pub fn build(mut self) -> RouteTable<T> {
        fn sort<T>(node: &mut Node<T>) {
            node.exact.sort_by_key(|c| c.order);
            node.prefix.sort_by_key(|c| c.order);
            node.literals.values_mut().for_each(sort);
            if let Some(param) = &mut node.param {
                sort(param);
            }
        }
        sort(&mut self.root);
        RouteTable {
            root: self.root,
            len: self.len,
        }
    }
}

impl<T> RouteTable<T> {
    /// Starts an empty table.
    pub fn builder() -> RouteTableBuilder<T> {
        RouteTableBuilder {
            root: Node::default(),
            len: 0,
        }
    }

    /// How many routes the table holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finds the route for a request. `host` is the Host header without its port.
    pub fn lookup(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<RouteMatch<'_, T>> {
        let rest = path.strip_prefix('/')?;
        find(&self.root, rest, method, host)
    }
}

/// Depth-first search, most specific first: literal, then param, then this node's prefix routes.
/// `rest` is the unmatched path after a `/`.
fn find<'a, T>(
    node: &'a Node<T>,
    rest: &str,
    method: &Method,
    host: Option<&str>,
) -> Option<RouteMatch<'a, T>> {
    let (segment, remainder) = match rest.split_once('/') {
        Some((segment, remainder)) => (segment, Some(remainder)),
        None => (rest, None),
    };
    let descend = |child: &'a Node<T>| match remainder {
        Some(remainder) => find(child, remainder, method, host),
        None => pick(&child.exact, method, host).or_else(|| pick(&child.prefix, method, host)),
    };
    node.literals
        .get(segment)
        .and_then(descend)
        .or_else(|| {
            node.param
                .as_deref()
                .filter(|_| !segment.is_empty())
                .and_then(descend)
        })
        .or_else(|| pick(&node.prefix, method, host))
}

fn pick<'a, T>(
    leaf: &'a [Candidate<T>],
    method: &Method,
    host: Option<&str>,
) -> Option<RouteMatch<'a, T>> {
    leaf.iter()
        .find(|c| c.filter.accepts(method, host))
        .map(|c| RouteMatch {
            route: &c.route,
            prefix: &c.prefix,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &[&str], RouteFilter)]) -> RouteTable<String> {
        let mut builder = RouteTable::builder();
        for (i, (id, paths, filter)) in routes.iter().enumerate() {
            builder.add(paths, filter.clone(), Arc::new(id.to_string()), i);
        }
        builder.build()
    }

    fn get(
        table: &RouteTable<String>,
        method: Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<String> {
        table
            .lookup(&method, host, path)
            .map(|m| m.route.to_string())
    }

    fn any() -> RouteFilter {
        RouteFilter::default()
    }

    #[test]
    fn exact_beats_param_beats_prefix() {
        let t = table(&[
            ("prefix", &["/users/*"], any()),
            ("param", &["/users/{id}"], any()),
            ("exact", &["/users/me"], any()),
        ]);
        assert_eq!(
            get(&t, Method::GET, None, "/users/me").as_deref(),
            Some("exact")
        );
        assert_eq!(
            get(&t, Method::GET, None, "/users/42").as_deref(),
            Some("param")
        );
        assert_eq!(
            get(&t, Method::GET, None, "/users/42/posts").as_deref(),
            Some("prefix")
        );
        assert_eq!(
            get(&t, Method::GET, None, "/users/").as_deref(),
            Some("prefix")
        );
        assert_eq!(
            get(&t, Method::GET, None, "/users").as_deref(),
            Some("prefix")
        );
        assert_eq!(get(&t, Method::GET, None, "/usersx"), None);
        assert_eq!(get(&t, Method::GET, None, "/other"), None);
    }

    #[test]
    fn method_filter_falls_back_to_an_enclosing_prefix() {
        let get_only = RouteFilter {
            methods: vec![Method::GET],
            ..any()
        };
        let t = table(&[
            ("catch-all", &["/*"], any()),
            ("api", &["/api/*"], any()),
            ("read", &["/api/items"], get_only),
        ]);
        assert_eq!(
            get(&t, Method::GET, None, "/api/items").as_deref(),
            Some("read")
        );
        assert_eq!(
            get(&t, Method::POST, None, "/api/items").as_deref(),
            Some("api")
        );
        assert_eq!(
            get(&t, Method::POST, None, "/elsewhere/deep/path").as_deref(),
            Some("catch-all")
        );
        assert_eq!(
            get(&t, Method::POST, None, "/").as_deref(),
            Some("catch-all")
        );
    }

    #[test]
    fn a_filtered_out_literal_backtracks_to_params_and_prefixes() {
        let get_only = RouteFilter {
            methods: vec![Method::GET],
            ..any()
        };
        let t = table(&[
            ("me", &["/users/me"], get_only.clone()),
            ("user", &["/users/{id}"], any()),
            ("me-tree", &["/u/me/*"], get_only),
            ("user-tree", &["/u/{id}/*"], any()),
            ("root", &["/*"], any()),
        ]);
        assert_eq!(
            get(&t, Method::GET, None, "/users/me").as_deref(),
            Some("me")
        );
        assert_eq!(
            get(&t, Method::POST, None, "/users/me").as_deref(),
            Some("user")
        );
        assert_eq!(
            get(&t, Method::GET, None, "/u/me/x").as_deref(),
            Some("me-tree")
        );
        assert_eq!(
            get(&t, Method::POST, None, "/u/me/x").as_deref(),
            Some("user-tree")
        );
        assert_eq!(
            get(&t, Method::POST, None, "/u/you").as_deref(),
            Some("user-tree")
        );
        // A param never matches an empty segment.
        assert_eq!(
            get(&t, Method::POST, None, "/users/").as_deref(),
            Some("root")
        );
        assert_eq!(get(&t, Method::GET, None, "no-leading-slash"), None);
    }

    #[test]
    fn hosts_and_priority_order_routes_on_one_path() {
        let t = table(&[
            ("plain", &["/x"], any()),
            (
                "wild",
                &["/x"],
                RouteFilter {
                    hosts: vec!["*.example.com".into()],
                    ..any()
                },
            ),
            (
                "exact-host",
                &["/x"],
                RouteFilter {
                    hosts: vec!["api.example.com".into()],
                    priority: 5,
                    ..any()
                },
            ),
        ]);
        assert_eq!(
            get(&t, Method::GET, Some("api.example.com"), "/x").as_deref(),
            Some("exact-host")
        );
        assert_eq!(
            get(&t, Method::GET, Some("www.example.com"), "/x").as_deref(),
            Some("wild")
        );
        assert_eq!(
            get(&t, Method::GET, Some("example.com"), "/x").as_deref(),
            Some("plain")
        );
        assert_eq!(get(&t, Method::GET, None, "/x").as_deref(), Some("plain"));
    }

    #[test]
    fn param_names_do_not_conflict_and_prefix_is_reported() {
        let t = table(&[
            ("a", &["/u/{id}"], any()),
            (
                "b",
                &["/u/{name}"],
                RouteFilter {
                    methods: vec![Method::PUT],
                    ..any()
                },
            ),
        ]);
        assert_eq!(get(&t, Method::PUT, None, "/u/1").as_deref(), Some("b"));
        assert_eq!(get(&t, Method::GET, None, "/u/1").as_deref(), Some("a"));
        assert_eq!(t.lookup(&Method::GET, None, "/u/1").unwrap().prefix, "/u");
        let t = table(&[("p", &["/api/v1/*"], any())]);
        assert_eq!(
            t.lookup(&Method::GET, None, "/api/v1/x/y").unwrap().prefix,
            "/api/v1"
        );
    }

    #[test]
    fn lookup_stays_correct_with_ten_thousand_routes() {
        let mut builder = RouteTable::builder();
        for i in 0..10_000 {
            let path = format!("/svc{i}/items/{{id}}");
            builder.add(&[path.as_str()], any(), Arc::new(format!("r{i}")), i);
        }
        let t = builder.build();
        assert_eq!(t.len(), 10_000);
        assert_eq!(
            get(&t, Method::GET, None, "/svc9876/items/5").as_deref(),
            Some("r9876")
        );
        assert_eq!(get(&t, Method::GET, None, "/svc10000/items/5"), None);
    }
}
