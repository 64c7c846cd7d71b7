//! The route table: maps a request's path, method and host to a route.
//!
//! Paths live in a segment trie, so lookup cost depends on the path's depth, not on the number
//! of routes. At each segment a literal child is tried before a `{param}` child, and both before
//! a prefix route (`/a/*`) ending at that node; when every route at the most specific match is
//! filtered out by method or host, the search backtracks to the next most specific one.
//! (matchit was the first choice, but it refuses `/users/*` next to `/users/{id}`, and it cannot
//! backtrack past a filtered-out match.)

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
    /// What orders candidates on one node: higher priority, then with hosts, then with methods,
    /// then by `key`.
    order: (i32, bool, bool),
    /// The route's key (its id): the last tie-break, and what [`RouteTableBuilder::remove`]
    /// finds it by.
    key: Arc<str>,
}

impl<T> Clone for Candidate<T> {
    fn clone(&self) -> Self {
        Candidate {
            route: self.route.clone(),
            filter: self.filter.clone(),
            prefix: self.prefix.clone(),
            order: self.order,
            key: self.key.clone(),
        }
    }
}

impl<T> Candidate<T> {
    fn rank(&self) -> ((i32, bool, bool), &str) {
        (self.order, &self.key)
    }
}

/// A trie node. Children are shared between a table and the tables edited from it: an edit
/// copies only the nodes on the paths it changes. The literal children are a persistent map
/// too: a node with 100,000 of them (`/r{i}/...` routes) is not copied whole for one edit. A
/// B-tree rather than a hash trie: a few bytes per child instead of about 200 (a hash trie
/// node has room for 32), and most nodes have a handful of children, where comparing a few
/// keys costs less than hashing one.
struct Node<T> {
    literals: imbl::OrdMap<Arc<str>, Arc<Node<T>>>,
    param: Option<Arc<Node<T>>>,
    /// Routes whose pattern ends exactly here.
    exact: Vec<Candidate<T>>,
    /// Prefix routes (`.../*`) whose base ends here; they match here and everything below.
    prefix: Vec<Candidate<T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literals: imbl::OrdMap::new(),
            param: None,
            exact: Vec::new(),
            prefix: Vec::new(),
        }
    }
}

impl<T> Clone for Node<T> {
    fn clone(&self) -> Self {
        Node {
            literals: self.literals.clone(),
            param: self.param.clone(),
            exact: self.exact.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literals.is_empty()
            && self.param.is_none()
            && self.exact.is_empty()
            && self.prefix.is_empty()
    }
}

/// An immutable table of routes. Cloning one is cheap, and [`RouteTable::edit`] changes a few
/// routes at the cost of the paths they are on, not of the whole table.
pub struct RouteTable<T> {
    root: Arc<Node<T>>,
    len: usize,
}

impl<T> Clone for RouteTable<T> {
    fn clone(&self) -> Self {
        RouteTable {
            root: self.root.clone(),
            len: self.len,
        }
    }
}

/// Builds a [`RouteTable`], from nothing or by editing one.
pub struct RouteTableBuilder<T> {
    root: Arc<Node<T>>,
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
    /// Adds `route` under each of its path patterns; `key` (its id) breaks ties, lower first,
    /// and is how [`RouteTableBuilder::remove`] finds it again.
    pub fn add(&mut self, patterns: &[&str], filter: RouteFilter, route: Arc<T>, key: &str) {
        let filter = Arc::new(filter);
        let key: Arc<str> = key.into();
        let order = (
            -filter.priority,
            filter.hosts.is_empty(),
            filter.methods.is_empty(),
        );
        for pattern in patterns {
            let (segments, is_prefix, literal_prefix) = parse_pattern(pattern);
            let mut node = Arc::make_mut(&mut self.root);
            for segment in segments {
                let child = if segment.starts_with('{') {
                    node.param.get_or_insert_with(Default::default)
                } else {
                    node.literals.entry(segment.into()).or_default()
                };
                node = Arc::make_mut(child);
            }
            let candidate = Candidate {
                route: route.clone(),
                filter: filter.clone(),
                prefix: literal_prefix.into(),
                order,
                key: key.clone(),
            };
            let leaf = if is_prefix {
                &mut node.prefix
            } else {
                &mut node.exact
            };
            // Kept in rank order as it grows (after equals, as a stable sort would put it), so
            // that building visits nothing: a wide node is not walked for one change.
            let at = leaf.partition_point(|c| c.rank() <= candidate.rank());
            // Room for one more, not for four: most leaves hold one route.
            leaf.reserve_exact(1);
            leaf.insert(at, candidate);
        }
        self.len += 1;
    }

    /// Takes out the route added with `key` under `patterns` (the patterns it was added with).
    pub fn remove(&mut self, patterns: &[&str], key: &str) {
        fn remove_at<T>(node: &mut Arc<Node<T>>, segments: &[&str], prefix: bool, key: &str) {
            let node = Arc::make_mut(node);
            match segments.split_first() {
                None => {
                    let leaf = if prefix {
                        &mut node.prefix
                    } else {
                        &mut node.exact
                    };
                    leaf.retain(|c| &*c.key != key);
                }
                Some((segment, rest)) if segment.starts_with('{') => {
                    if let Some(child) = &mut node.param {
                        remove_at(child, rest, prefix, key);
                        if child.is_empty() {
                            node.param = None;
                        }
                    }
                }
                Some((segment, rest)) => {
                    if let Some(child) = node.literals.get_mut(*segment) {
                        remove_at(child, rest, prefix, key);
                        if child.is_empty() {
                            node.literals.remove(*segment);
                        }
                    }
                }
            }
        }
        for pattern in patterns {
            let (segments, is_prefix, _) = parse_pattern(pattern);
            remove_at(&mut self.root, &segments, is_prefix, key);
        }
        self.len = self.len.saturating_sub(1);
    }

    /// Builds the table.
    pub fn build(self) -> RouteTable<T> {
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
            root: Arc::default(),
            len: 0,
        }
    }

    /// Starts a builder holding this table's routes, to add and remove a few; the table itself
    /// is unchanged.
    pub fn edit(&self) -> RouteTableBuilder<T> {
        RouteTableBuilder {
            root: self.root.clone(),
            len: self.len,
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
        .map(|child| &**child)
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
    use proptest::prelude::*;

    fn table(routes: &[(&str, &[&str], RouteFilter)]) -> RouteTable<String> {
        let mut builder = RouteTable::builder();
        for (i, (id, paths, filter)) in routes.iter().enumerate() {
            builder.add(paths, filter.clone(), Arc::new(id.to_string()), &key(i));
        }
        builder.build()
    }

    /// A key that sorts as `index` does.
    fn key(index: usize) -> String {
        format!("{index:08}")
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
            builder.add(&[path.as_str()], any(), Arc::new(format!("r{i}")), &key(i));
        }
        let t = builder.build();
        assert_eq!(t.len(), 10_000);
        assert_eq!(
            get(&t, Method::GET, None, "/svc9876/items/5").as_deref(),
            Some("r9876")
        );
        assert_eq!(get(&t, Method::GET, None, "/svc10000/items/5"), None);
    }

    /// A random route pattern: its segments and whether it ends in `/*`.
    #[derive(Clone, Debug)]
    struct Pattern {
        segments: Vec<&'static str>,
        is_prefix: bool,
    }

    impl Pattern {
        fn text(&self) -> String {
            let body = self.segments.join("/");
            match (self.is_prefix, self.segments.is_empty()) {
                (true, true) => "/*".into(),
                (true, false) => format!("/{body}/*"),
                (false, _) => format!("/{body}"),
            }
        }

        /// What `lookup` reports as `prefix`: the literal segments before the first param.
        fn literal_prefix(&self) -> String {
            let literal: String = self
                .segments
                .iter()
                .take_while(|s| !s.starts_with('{'))
                .map(|s| format!("/{s}"))
                .collect();
            literal.trim_end_matches('/').to_owned()
        }

        /// The rank sequence of this pattern's match against `path` (the segments after the
        /// leading `/`), or `None` when it does not match: per matched segment 0 for a literal
        /// and 1 for a param; a prefix match appends 2. Lower sorts first, and a strict prefix
        /// of a sequence sorts before it, which is the trie's depth-first order.
        fn rank(&self, path: &[&str]) -> Option<Vec<u8>> {
            let depth = self.segments.len();
            let fits = if self.is_prefix {
                depth <= path.len()
            } else {
                depth == path.len()
            };
            if !fits {
                return None;
            }
            let mut rank = Vec::with_capacity(depth + 1);
            for (pattern, segment) in self.segments.iter().zip(path) {
                if pattern.starts_with('{') {
                    if segment.is_empty() {
                        return None;
                    }
                    rank.push(1);
                } else if pattern == segment {
                    rank.push(0);
                } else {
                    return None;
                }
            }
            if self.is_prefix {
                rank.push(2);
            }
            Some(rank)
        }
    }

    #[derive(Clone, Debug)]
    struct RandomRoute {
        patterns: Vec<Pattern>,
        methods: Vec<Method>,
        hosts: Vec<String>,
        priority: i32,
    }

    impl RandomRoute {
        fn filter(&self) -> RouteFilter {
            RouteFilter {
                methods: self.methods.clone(),
                hosts: self.hosts.clone(),
                priority: self.priority,
            }
        }
    }

    fn pattern_strategy() -> impl Strategy<Value = Pattern> {
        let segment = prop::sample::select(vec!["a", "b", "{id}", "{x}", ""]);
        (
            prop::collection::vec(segment, 0..4),
            prop::arbitrary::any::<bool>(),
        )
            .prop_map(|(mut segments, is_prefix)| {
                // `/` is one empty segment, as `parse_pattern` reads it.
                if !is_prefix && segments.is_empty() {
                    segments.push("");
                }
                Pattern {
                    segments,
                    is_prefix,
                }
            })
    }

    fn route_strategy() -> impl Strategy<Value = RandomRoute> {
        let methods = prop::sample::select(vec![
            vec![],
            vec![Method::GET],
            vec![Method::POST],
            vec![Method::GET, Method::POST],
        ]);
        let hosts = prop::sample::select(vec![
            vec![],
            vec!["a.example".to_owned()],
            vec!["*.example".to_owned()],
            vec!["a.example".to_owned(), "*.example".to_owned()],
        ]);
        (
            prop::collection::vec(pattern_strategy(), 1..3),
            methods,
            hosts,
            -1..=1i32,
        )
            .prop_map(|(patterns, methods, hosts, priority)| RandomRoute {
                patterns,
                methods,
                hosts,
                priority,
            })
    }

    fn request_path_strategy() -> impl Strategy<Value = String> {
        let segment = prop::sample::select(vec!["a", "b", "c", "", "{id}"]);
        (prop::collection::vec(segment, 1..6), 0..8u8).prop_map(|(segments, slash)| {
            let path = segments.join("/");
            // Now and then no leading slash, which never matches.
            if slash == 0 { path } else { format!("/{path}") }
        })
    }

    fn request_method_strategy() -> impl Strategy<Value = Method> {
        prop::sample::select(vec![Method::GET, Method::POST, Method::PUT])
    }

    fn request_host_strategy() -> impl Strategy<Value = Option<String>> {
        prop::option::of(
            prop::sample::select(vec![
                "a.example",
                "A.Example",
                "b.a.example",
                "x.example",
                "example",
                ".example",
                "a.examplex",
                "b.example.org",
            ])
            .prop_map(str::to_owned),
        )
    }

    /// A builder holding `routes`, each valued by its index.
    fn builder(routes: &[RandomRoute]) -> RouteTableBuilder<usize> {
        let mut builder = RouteTable::builder();
        for (index, route) in routes.iter().enumerate() {
            add(&mut builder, route, index);
        }
        builder
    }

    /// Adds `route` to `builder`, valued and keyed by `index`.
    fn add(builder: &mut RouteTableBuilder<usize>, route: &RandomRoute, index: usize) {
        let texts: Vec<String> = route.patterns.iter().map(Pattern::text).collect();
        let patterns: Vec<&str> = texts.iter().map(String::as_str).collect();
        builder.add(&patterns, route.filter(), Arc::new(index), &key(index));
    }

    fn reference_host_matches(pattern: &str, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            // `*.example`: at least one character, then `.example`.
            Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            None => host == pattern,
        }
    }

    /// Scans every route: the matching pattern with the lowest rank sequence wins, ties going
    /// by (higher priority, has hosts, has methods, insertion order). Returns the route's index
    /// and the pattern's literal prefix.
    fn reference(
        routes: &[RandomRoute],
        method: &Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<(usize, String)> {
        let rest = path.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        let mut matches = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            let method_ok = route.methods.is_empty() || route.methods.contains(method);
            let host_ok = route.hosts.is_empty()
                || host.is_some_and(|h| route.hosts.iter().any(|p| reference_host_matches(p, h)));
            if !method_ok || !host_ok {
                continue;
            }
            let order = (
                -route.priority,
                route.hosts.is_empty(),
                route.methods.is_empty(),
                index,
            );
            for pattern in &route.patterns {
                if let Some(rank) = pattern.rank(&segments) {
                    matches.push(((rank, order), (index, pattern.literal_prefix())));
                }
            }
        }
        matches
            .into_iter()
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, found)| found)
    }

    fn lookup_owned(
        table: &RouteTable<usize>,
        method: &Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<(usize, String)> {
        table
            .lookup(method, host, path)
            .map(|m| (**m.route, m.prefix.to_owned()))
    }

    proptest! {
        #![proptest_config(crate::proptest_cases(20_000))]

        #[test]
        fn fuzz_router_agrees_with_a_linear_reference(
            routes in prop::collection::vec(route_strategy(), 0..8),
            requests in prop::collection::vec(
                (request_method_strategy(), request_host_strategy(), request_path_strategy()),
                1..8,
            ),
        ) {
            let table = builder(&routes).build();
            prop_assert_eq!(table.len(), routes.len());
            for (method, host, path) in &requests {
                let host = host.as_deref();
                prop_assert_eq!(
                    lookup_owned(&table, method, host, path),
                    reference(&routes, method, host, path),
                    "{} {:?} {:?}", method, host, path
                );
            }
        }

        #[test]
        fn fuzz_an_edited_table_answers_as_one_built_from_scratch(
            routes in prop::collection::vec(route_strategy(), 0..10),
            removed in prop::collection::vec(prop::bool::ANY, 10),
            added in prop::collection::vec(route_strategy(), 0..4),
            requests in prop::collection::vec(
                (request_method_strategy(), request_host_strategy(), request_path_strategy()),
                1..8,
            ),
        ) {
            let before = builder(&routes).build();
            let mut edit = before.edit();
            let mut kept = 0;
            for (index, route) in routes.iter().enumerate() {
                if removed[index] {
                    let texts: Vec<String> = route.patterns.iter().map(Pattern::text).collect();
                    let patterns: Vec<&str> = texts.iter().map(String::as_str).collect();
                    edit.remove(&patterns, &key(index));
                } else {
                    kept += 1;
                }
            }
            // Added routes take keys after every existing one, so that positions in `all`
            // order them as the table does.
            let mut all: Vec<Option<RandomRoute>> =
                routes.iter().enumerate().map(|(i, r)| (!removed[i]).then(|| r.clone())).collect();
            for route in &added {
                add(&mut edit, route, all.len());
                all.push(Some(route.clone()));
            }
            let edited = edit.build();
            prop_assert_eq!(edited.len(), kept + added.len());
            // What stands in for a removed route matches nothing.
            let never = RandomRoute {
                patterns: Vec::new(),
                methods: Vec::new(),
                hosts: Vec::new(),
                priority: 0,
            };
            let reference_routes: Vec<RandomRoute> =
                all.into_iter().map(|r| r.unwrap_or_else(|| never.clone())).collect();
            for (method, host, path) in &requests {
                let host = host.as_deref();
                prop_assert_eq!(
                    lookup_owned(&edited, method, host, path),
                    reference(&reference_routes, method, host, path),
                    "{} {:?} {:?}", method, host, path
                );
                // The table it was edited from is unchanged.
                prop_assert_eq!(
                    lookup_owned(&before, method, host, path),
                    reference(&routes, method, host, path),
                    "{} {:?} {:?}", method, host, path
                );
            }
        }

        #[test]
        fn fuzz_router_never_panics_on_any_string(
            routes in prop::collection::vec(route_strategy(), 0..6),
            raw_patterns in prop::collection::vec(prop::arbitrary::any::<String>(), 0..3),
            // Arbitrary strings seldom hold a `/`: mix in paths over the router's own alphabet.
            path in prop_oneof![prop::arbitrary::any::<String>(), "[ab/{}é*. ]{0,16}"],
            host in prop::option::of(prop::arbitrary::any::<String>()),
            raw_host_pattern in prop::arbitrary::any::<String>(),
        ) {
            let mut table = builder(&routes);
            // Patterns and host filters that validation would refuse must not break lookups.
            let raw: Vec<&str> = raw_patterns.iter().map(String::as_str).collect();
            let filter = RouteFilter {
                hosts: vec![raw_host_pattern.clone(), format!("*.{raw_host_pattern}")],
                ..RouteFilter::default()
            };
            table.add(&raw, filter, Arc::new(routes.len()), &key(routes.len()));
            let table = table.build();
            let host = host.as_deref();
            for method in [Method::GET, Method::POST] {
                for path in [path.clone(), format!("/{path}")] {
                    let found = table.lookup(&method, host, &path);
                    if let Some(found) = found {
                        prop_assert!(**found.route <= routes.len());
                    }
                    // The reference covers every route but the raw one: where that one cannot
                    // match (no patterns), both agree on arbitrary paths too.
                    if raw.is_empty() {
                        prop_assert_eq!(
                            lookup_owned(&table, &method, host, &path),
                            reference(&routes, &method, host, &path),
                            "{} {:?} {:?}", method, host, path
                        );
                    }
                }
            }
        }
    }
}
