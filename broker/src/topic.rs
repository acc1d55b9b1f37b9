//! Topic names and filters: `/`-separated levels; in a filter `*` matches exactly one level and
//! `#` any number of levels (zero included). The same rules serve the router's address
//! patterns and the broker's subscriptions.

/// Most levels a filter or a topic may have; longer ones never match (they are refused when
/// declared).
pub const MAX_LEVELS: usize = 256;

/// Whether `filter` matches `topic`. Linear in the product of their level counts (dynamic
/// programming, no backtracking), so a hostile filter with many `#` cannot blow up.
pub fn matches(filter: &str, topic: &str) -> bool {
    if !filter.contains(['*', '#']) {
        // No wildcard character at all: only the same name matches (no allocation).
        return filter == topic && topic.split('/').count() <= MAX_LEVELS;
    }
    let p: Vec<&str> = filter.split('/').collect();
    let a: Vec<&str> = topic.split('/').collect();
    if p.len() > MAX_LEVELS || a.len() > MAX_LEVELS {
        return false;
    }
    // next[j]: does p[i+1..] match a[j..]; cur[j]: does p[i..] match a[j..].
    let mut next = vec![false; a.len() + 1];
    next[a.len()] = true;
    let mut cur = vec![false; a.len() + 1];
    for seg in p.iter().rev() {
        for j in (0..=a.len()).rev() {
            cur[j] = match *seg {
                "#" => next[j] || (j < a.len() && cur[j + 1]),
                "*" => j < a.len() && next[j + 1],
                s => j < a.len() && a[j] == s && next[j + 1],
            };
        }
        std::mem::swap(&mut cur, &mut next);
    }
    next[0]
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn levels_and_wildcards() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(matches("a/*/c", "a/x/c"));
        assert!(!matches("a/*/c", "a/x/y/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "anything/at/all"));
        assert!(matches("a/#/z", "a/z"));
        assert!(matches("a/#/z", "a/b/c/z"));
        assert!(!matches("a/#/z", "a/b/c"));
        assert!(matches("*/#", "x"));
    }

    #[test]
    fn many_hashes_stay_cheap() {
        let filter = vec!["#"; 200].join("/") + "/nomatch";
        let topic = vec!["x"; 250].join("/");
        let t = std::time::Instant::now();
        assert!(!matches(&filter, &topic));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
