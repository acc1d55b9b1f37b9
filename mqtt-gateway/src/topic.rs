//! MQTT topic names and filters, and their Enmesh addresses.
//!
//! MQTT topic `T` is the Enmesh topic address `prefix + T` (prefix `mqtt/` by default, declared
//! as a topic address): levels are `/` in both. MQTT's single-level wildcard `+` is Enmesh's
//! `*`; `#` is the same. A filter with a literal `*` level would change meaning, so such a
//! filter is refused (SUBACK 0x8F); `*` inside a level (`a*b`) is an ordinary character in both.
//! Filters starting with `$` (`$SYS/...`) are not served (0x8F), and `$share/GROUP/FILTER`
//! (shared subscriptions) is recognised by [`shared`].

/// Whether `f` is a valid MQTT topic filter (MQTT 4.7.1): non-empty, `#` only as the whole
/// last level, `+` only as a whole level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return false;
        }
        if l.contains('+') && *l != "+" {
            return false;
        }
    }
    true
}

/// A shared subscription `$share/GROUP/FILTER` as `(group, filter)`.
pub fn shared(f: &str) -> Option<(&str, &str)> {
    let rest = f.strip_prefix("$share/")?;
    let (group, filter) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return None;
    }
    Some((group, filter))
}

/// Whether MQTT topic name `t` matches filter `f` (`+` one level, `#` the rest; topics
/// starting with `$` match no wildcard at the first level, §4.7.2).
pub fn matches(f: &str, t: &str) -> bool {
    if t.starts_with('$') && f.starts_with(['+', '#']) {
        return false;
    }
    let mut fl = f.split('/');
    let mut tl = t.split('/');
    loop {
        match (fl.next(), tl.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The Enmesh topic filter for MQTT filter `f`, or `None` if it cannot be served.
pub fn filter_address(prefix: &str, f: &str) -> Option<String> {
    if !valid_filter(f) || f.starts_with('$') {
        return None;
    }
    let mut out = String::with_capacity(prefix.len() + f.len());
    out.push_str(prefix);
    for (i, l) in f.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        match l {
            "+" => out.push('*'),
            "*" => return None,
            l => out.push_str(l),
        }
    }
    Some(out)
}

/// The Enmesh address of MQTT topic name `t`.
pub fn name_address(prefix: &str, t: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + t.len());
    out.push_str(prefix);
    out.push_str(t);
    out
}

/// The MQTT topic name of an Enmesh address, if it lies under `prefix`.
pub fn address_topic<'a>(prefix: &str, address: &'a str) -> Option<&'a str> {
    address.strip_prefix(prefix).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_map_and_invalid_ones_are_refused() {
        assert_eq!(
            filter_address("mqtt/", "a/+/c").as_deref(),
            Some("mqtt/a/*/c")
        );
        assert_eq!(filter_address("mqtt/", "#").as_deref(), Some("mqtt/#"));
        assert_eq!(filter_address("", "a/b*c/#").as_deref(), Some("a/b*c/#"));
        for bad in ["", "a/#/b", "a#", "a/b+", "a/*/c", "$SYS/x"] {
            assert_eq!(filter_address("mqtt/", bad), None, "{bad}");
        }
        assert_eq!(shared("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(shared("$share//a"), None);
        assert_eq!(shared("$share/g"), None);
        assert_eq!(address_topic("mqtt/", "mqtt/a/b"), Some("a/b"));
        assert_eq!(address_topic("mqtt/", "other"), None);
        assert!(matches("a/+/c", "a/b/c") && matches("a/#", "a") && matches("#", "a/b"));
        assert!(!matches("a/+", "a/b/c") && !matches("a/b", "a") && !matches("+/x", "$SYS/x"));
    }
}
