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
    match match_without_inner_hash(filter, topic) {
        Some(m) => m,
        None => matches_general(filter, topic),
    }
}

/// Any filter, `#` anywhere: dynamic programming over the levels.
fn matches_general(filter: &str, topic: &str) -> bool {
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

/// Level by level, allocating nothing, when `filter` has no `#` before its last level (every
/// MQTT filter, and the usual Enmesh pattern); `None` leaves the rest to the general algorithm.
fn match_without_inner_hash(filter: &str, topic: &str) -> Option<bool> {
    let mut f = filter.split('/').peekable();
    let mut t = topic.split('/');
    // Levels of each seen so far (both are bounded by MAX_LEVELS).
    let mut levels = 0usize;
    while let Some(seg) = f.next() {
        if seg == "#" {
            if f.peek().is_some() {
                return None;
            }
            // The remaining levels, zero included.
            return Some(levels < MAX_LEVELS && levels + t.count() <= MAX_LEVELS);
        }
        let Some(level) = t.next() else {
            return Some(false);
        };
        levels += 1;
        if seg != "*" && seg != level {
            return Some(false);
        }
    }
    Some(t.next().is_none() && levels <= MAX_LEVELS)
}

#[cfg(test)]
mod tests {
    use super::{matches, matches_general as general};

    #[test]
    fn the_fast_path_agrees_with_the_general_algorithm() {
        // Every filter and topic of up to 4 levels over a small alphabet.
        fn all(levels: &[&str], max: usize) -> Vec<String> {
            let mut out: Vec<String> = levels.iter().map(|s| s.to_string()).collect();
            let mut last = out.clone();
            for _ in 1..max {
                let mut grown = Vec::new();
                for p in &last {
                    for l in levels {
                        grown.push(format!("{p}/{l}"));
                    }
                }
                out.extend(grown.iter().cloned());
                last = grown;
            }
            out
        }
        let filters = all(&["a", "b", "*", "#", ""], 4);
        let topics = all(&["a", "b", ""], 4);
        for f in &filters {
            for t in &topics {
                assert_eq!(matches(f, t), general(f, t), "{f} vs {t}");
            }
        }
        // At the level bound.
        let long = vec!["x"; super::MAX_LEVELS].join("/");
        let longer = vec!["x"; super::MAX_LEVELS + 1].join("/");
        for f in ["#", "x/#", "*/#", &long, &longer, &(long.clone() + "/#")] {
            for t in [&long, &longer] {
                assert_eq!(matches(f, t), general(f, t), "{} levels", f.len());
            }
        }
    }

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
