//! Address rules: which type an address string has. Exact names win over prefixes (longest
//! first), prefixes over patterns (in declaration order), patterns over the default.
//!
//! Patterns use `/` as separator, `*` for exactly one segment and `#` for zero or more
//! (`broker::topic::matches`).

use std::collections::HashMap;

use serde::Serialize;

use crate::config::{AddressDecl, AddressType};

/// Prefix of the addresses the router gives to dynamic receivers.
pub const DYNAMIC_PREFIX: &str = "_dynamic/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Api,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    #[serde(flatten)]
    pub decl: AddressDecl,
    pub origin: Origin,
}

#[derive(Debug, Default)]
pub struct Rules {
    exact: HashMap<String, Rule>,
    prefixes: Vec<Rule>,
    patterns: Vec<Rule>,
    default: Option<AddressType>,
}

/// Most rules a management client may add (the table is memory a remote peer can grow).
pub const MAX_RULES: usize = 100_000;

impl Rules {
    pub fn new(decls: &[AddressDecl], default: AddressType) -> Self {
        let mut r = Rules {
            default: Some(default),
            ..Default::default()
        };
        for d in decls {
            r.insert(d.clone(), Origin::Config);
        }
        r
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.prefixes.len() + self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or replaces a rule. Returns false when the table is full.
    pub fn insert(&mut self, decl: AddressDecl, origin: Origin) -> bool {
        self.remove(decl.key());
        if self.len() >= MAX_RULES {
            return false;
        }
        let rule = Rule { decl, origin };
        if let Some(n) = rule.decl.name.clone() {
            self.exact.insert(n, rule);
        } else if rule.decl.prefix.is_some() {
            self.prefixes.push(rule);
            // Longest prefix first.
            self.prefixes
                .sort_by_key(|r| std::cmp::Reverse(r.decl.key().len()));
        } else {
            self.patterns.push(rule);
        }
        true
    }

    /// Removes the rule declared with `key`; true if there was one.
    pub fn remove(&mut self, key: &str) -> bool {
        if self.exact.remove(key).is_some() {
            return true;
        }
        let before = self.prefixes.len() + self.patterns.len();
        self.prefixes.retain(|r| r.decl.key() != key);
        self.patterns.retain(|r| r.decl.key() != key);
        before != self.prefixes.len() + self.patterns.len()
    }

    pub fn resolve(&self, address: &str) -> AddressType {
        if address.starts_with(DYNAMIC_PREFIX) {
            return AddressType::Anycast;
        }
        self.rule_for(address)
            .map_or(self.default.unwrap_or(AddressType::Anycast), |d| d.kind)
    }

    /// The declaration that decides `address` (exact, then longest prefix, then first pattern).
    pub fn rule_for(&self, address: &str) -> Option<&AddressDecl> {
        if let Some(r) = self.exact.get(address) {
            return Some(&r.decl);
        }
        self.prefixes
            .iter()
            .find(|r| address.starts_with(r.decl.key()))
            .or_else(|| {
                self.patterns
                    .iter()
                    .find(|r| pattern_matches(r.decl.key(), address))
            })
            .map(|r| &r.decl)
    }

    pub fn list(&self) -> Vec<Rule> {
        let mut v: Vec<Rule> = self.exact.values().cloned().collect();
        v.sort_by(|a, b| a.decl.key().cmp(b.decl.key()));
        v.extend(self.prefixes.iter().cloned());
        v.extend(self.patterns.iter().cloned());
        v
    }
}

/// Matches `/`-separated levels: `*` is one level, `#` zero or more (the broker's topic rules,
/// so that a router pattern and a subscription filter mean the same thing).
pub fn pattern_matches(pattern: &str, address: &str) -> bool {
    broker::topic::matches(pattern, address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(
        name: Option<&str>,
        prefix: Option<&str>,
        pattern: Option<&str>,
        kind: AddressType,
    ) -> AddressDecl {
        AddressDecl {
            name: name.map(Into::into),
            prefix: prefix.map(Into::into),
            pattern: pattern.map(Into::into),
            kind,
            dead_letter: None,
            max_delivery_attempts: None,
            max_ttl_ms: None,
            expiry_address: None,
            topic: None,
            durable: None,
        }
    }

    #[test]
    fn precedence() {
        let r = Rules::new(
            &[
                decl(Some("mc/special"), None, None, AddressType::Anycast),
                decl(None, Some("mc/"), None, AddressType::Multicast),
                decl(None, None, Some("q/*/orders"), AddressType::Queue),
                decl(None, None, Some("t/#"), AddressType::Topic),
            ],
            AddressType::Anycast,
        );
        assert_eq!(r.resolve("mc/x"), AddressType::Multicast);
        assert_eq!(r.resolve("mc/special"), AddressType::Anycast);
        assert_eq!(r.resolve("q/eu/orders"), AddressType::Queue);
        assert_eq!(r.resolve("q/eu/x/orders"), AddressType::Anycast);
        assert_eq!(r.resolve("t"), AddressType::Topic);
        assert_eq!(r.resolve("t/a/b/c"), AddressType::Topic);
        assert_eq!(r.resolve("other"), AddressType::Anycast);
    }
}
