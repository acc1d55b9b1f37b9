//! SASL mechanisms on the server side, behind [`Authenticator`] so that SCRAM and EXTERNAL can
//! join later, and the client's choice of mechanism.

use std::collections::HashMap;

use bytes::Bytes;

/// The result of one SASL step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslStep {
    Challenge(Bytes),
    Success {
        identity: String,
    },
    /// SASL outcome code: 1 auth, 2 sys, 3 sys-perm, 4 sys-temp.
    Failure(u8),
}

/// A server-side authenticator for one connection.
pub trait Authenticator: Send {
    /// Mechanisms offered, in order of preference.
    fn mechanisms(&self) -> Vec<String>;
    /// Whether a client may skip SASL and send the AMQP header directly.
    fn allow_no_sasl(&self) -> bool;
    fn start(&mut self, mechanism: &str, initial_response: Option<&[u8]>) -> SaslStep;
    fn step(&mut self, response: &[u8]) -> SaslStep;
}

/// ANONYMOUS and PLAIN. With no users configured every PLAIN login succeeds (a development
/// default, like the standalone mode); with users, passwords must match.
#[derive(Debug, Clone, Default)]
pub struct PlainAndAnonymous {
    pub allow_anonymous: bool,
    pub users: Option<HashMap<String, String>>,
}

impl Authenticator for PlainAndAnonymous {
    fn mechanisms(&self) -> Vec<String> {
        let mut m = vec!["PLAIN".to_owned()];
        if self.allow_anonymous {
            m.push("ANONYMOUS".to_owned());
        }
        m
    }
    fn allow_no_sasl(&self) -> bool {
        self.allow_anonymous
    }
    fn start(&mut self, mechanism: &str, initial_response: Option<&[u8]>) -> SaslStep {
        match mechanism {
            "ANONYMOUS" if self.allow_anonymous => SaslStep::Success {
                identity: "anonymous".into(),
            },
            "PLAIN" => match initial_response {
                Some(r) => self.plain(r),
                None => SaslStep::Challenge(Bytes::new()),
            },
            _ => SaslStep::Failure(1),
        }
    }
    fn step(&mut self, response: &[u8]) -> SaslStep {
        self.plain(response)
    }
}

impl PlainAndAnonymous {
    fn plain(&self, r: &[u8]) -> SaslStep {
        // authzid NUL authcid NUL passwd
        let mut parts = r.split(|b| *b == 0);
        let (_authz, user, pass) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(u), Some(p)) => (a, u, p),
            _ => return SaslStep::Failure(1),
        };
        let (Ok(user), Ok(pass)) = (std::str::from_utf8(user), std::str::from_utf8(pass)) else {
            return SaslStep::Failure(1);
        };
        match &self.users {
            None => SaslStep::Success {
                identity: user.to_owned(),
            },
            Some(users) if users.get(user).is_some_and(|p| p == pass) => SaslStep::Success {
                identity: user.to_owned(),
            },
            Some(_) => SaslStep::Failure(1),
        }
    }
}

/// The mechanism a client uses.
#[derive(Debug, Clone)]
pub struct SaslClient {
    pub mechanism: String,
    pub initial_response: Option<Bytes>,
}

impl SaslClient {
    pub fn anonymous() -> Self {
        SaslClient {
            mechanism: "ANONYMOUS".into(),
            initial_response: None,
        }
    }
    pub fn plain(user: &str, password: &str) -> Self {
        let mut r = Vec::new();
        r.push(0);
        r.extend_from_slice(user.as_bytes());
        r.push(0);
        r.extend_from_slice(password.as_bytes());
        SaslClient {
            mechanism: "PLAIN".into(),
            initial_response: Some(r.into()),
        }
    }
}
