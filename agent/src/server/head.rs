//! What the routes read of a request ([`Head`]): the same few facts from hyper's whole
//! request or from a head the plain path read in place.

use http::{Method, Request, header};

/// What the routes read of a request: hyper's whole request, or a head the plain path read
/// in place (`server::plain`), for which no `Uri` or header map is built.
pub(crate) trait Head {
    fn method(&self) -> &Method;
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    /// An `Accept` names `application/octet-stream`: the raw value is asked for.
    fn wants_raw(&self) -> bool;
    /// The request carries a body (the agent's requests carry none).
    fn has_body(&self) -> bool;
}

impl<B> Head for Request<B> {
    fn method(&self) -> &Method {
        self.method()
    }

    fn path(&self) -> &str {
        self.uri().path()
    }

    fn query(&self) -> Option<&str> {
        self.uri().query()
    }

    /// The plain path (`plain::asks_raw`) reads `Accept` the same way: a change here is a
    /// change there.
    fn wants_raw(&self) -> bool {
        self.headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().starts_with("application/octet-stream")))
    }

    fn has_body(&self) -> bool {
        let len = self
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        matches!(len, Some(n) if n > 0) || self.headers().contains_key(header::TRANSFER_ENCODING)
    }
}
