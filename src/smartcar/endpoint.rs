//! The logical endpoints carpulse asks of a vehicle: one typed name each, so the client, the
//! gates, the poller and the metrics route an [`Endpoint`] instead of a string. Its spelling
//! ([`Endpoint::as_str`]) is a contract: the `endpoint` label of metrics and logs,
//! `poll_events.endpoint`, the store's `poll_endpoints` names and the `vehicle_blocks` rows.
//! Names that come from outside (the store, a URL) are parsed with [`Endpoint::parse`], which
//! gives `None` for a name carpulse does not know, so the caller keeps it working as a string.

use std::fmt;

/// One logical endpoint: what one poll event and one `endpoint` metric label is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Battery,
    Charge,
    Info,
    Vin,
    Odometer,
    /// The capability read (v2 `/permissions`, a v3 signal listing): no reading of its own.
    Capabilities,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Battery,
        Endpoint::Charge,
        Endpoint::Info,
        Endpoint::Vin,
        Endpoint::Odometer,
        Endpoint::Capabilities,
    ];

    /// Its name, as metrics, logs and the store spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Endpoint::Battery => "battery",
            Endpoint::Charge => "charge",
            Endpoint::Info => "info",
            Endpoint::Vin => "vin",
            Endpoint::Odometer => "odometer",
            Endpoint::Capabilities => "capabilities",
        }
    }

    /// The endpoint [`as_str`](Self::as_str) names; `None` for any other name.
    pub fn parse(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.as_str() == name)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: `{endpoint:<12}` in a table aligns like the `&str` did.
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_a_contract_and_parse_back() {
        // Metric labels, `poll_events.endpoint`, `poll_endpoints` and block rows use them.
        assert_eq!(
            Endpoint::ALL.map(Endpoint::as_str),
            [
                "battery",
                "charge",
                "info",
                "vin",
                "odometer",
                "capabilities"
            ]
        );
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::parse(e.as_str()), Some(e));
            assert_eq!(e.to_string(), e.as_str());
            assert_eq!(format!("{e:<13}|"), format!("{:<13}|", e.as_str()));
        }
        assert_eq!(Endpoint::parse("Battery"), None);
        assert_eq!(Endpoint::parse("tires"), None);
        assert_eq!(Endpoint::parse(""), None);
    }
}
