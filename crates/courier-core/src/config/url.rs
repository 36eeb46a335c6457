//! A courier URL taken apart for the backend its scheme selects (`Config::from_url`).

use crate::{Error, Result};

use super::secret::redact_url;

/// The parameters every backend takes; a backend reads the others through
/// [`BackendUrl::params`].
const COMMON: &[&str] = &["guarantee", "auto_create", "concurrency", "idempotency"];

/// A courier URL, `<scheme>://<authority><path>?<parameters>`, as a backend's
/// [`BackendSection::from_url`](super::BackendSection::from_url) reads it.
#[derive(Debug, Clone)]
pub struct BackendUrl<'a> {
    text: &'a str,
    scheme: &'a str,
    authority: &'a str,
    path: &'a str,
    url: ::url::Url,
    common: Vec<(String, String)>,
    params: Vec<(String, String)>,
}

impl<'a> BackendUrl<'a> {
    /// Take `text` apart. A URL without `//` after the scheme is refused with the fix.
    pub fn parse(text: &'a str) -> Result<Self> {
        let Some((scheme, rest)) = text.split_once("://") else {
            let fix = match text.split_once(':') {
                Some((scheme, rest)) => {
                    format!("write {scheme}://{}", rest.trim_start_matches('/'))
                }
                None => {
                    "e.g. memory://, kafka://host:9092, amqp://host, sqs://us-east-1".to_owned()
                }
            };
            return Err(Error::config(format!(
                "invalid courier URL {:?}: a courier URL is <scheme>://…; {fix}",
                redact_url(text)
            )));
        };
        // The authority runs to the first `/` or `?`; what follows up to `?` is the path.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..end];
        let path = &rest[end..rest.find('?').unwrap_or(rest.len()).max(end)];
        // The `url` crate accepts one host; a host list (`kafka://a:9092,b:9092`) is kept
        // verbatim as the authority and parsed with a placeholder host.
        let parse_text = if authority.contains(',') {
            text.replacen(authority, "host-list", 1)
        } else {
            text.to_owned()
        };
        let url = ::url::Url::parse(&parse_text).map_err(|e| {
            Error::config(format!("invalid courier URL {:?}: {e}", redact_url(text)))
        })?;
        let (common, params) = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .partition(|(k, _)| COMMON.contains(&k.as_str()));
        Ok(BackendUrl {
            text,
            scheme,
            authority,
            path,
            url,
            common,
            params,
        })
    }

    /// The scheme (`kafka`, `amqps`, …).
    pub fn scheme(&self) -> &str {
        self.scheme
    }

    /// Everything between `//` and the path or query, verbatim (a host list stays one string).
    pub fn authority(&self) -> &str {
        self.authority
    }

    /// The host, when the authority names one.
    pub fn host(&self) -> Option<&str> {
        self.url.host_str().filter(|h| !h.is_empty())
    }

    /// The URL without its query: what a backend whose native address is a URL (AMQP) keeps.
    pub fn without_query(&self) -> String {
        let mut plain = self.url.clone();
        plain.set_query(None);
        plain.to_string()
    }

    /// The backend's own parameters (the common ones are taken by `Config::from_url`).
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The parameters every backend takes: `guarantee`, `auto_create`, `concurrency`,
    /// `idempotency`.
    pub fn common_params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.common.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The `auto_create` parameter (`false` when absent).
    pub fn auto_create(&self) -> Result<bool> {
        match self.common_params().find(|(k, _)| *k == "auto_create") {
            Some((k, v)) => Self::bool_param(k, v),
            None => Ok(false),
        }
    }

    /// A `true`/`false` parameter.
    pub fn bool_param(name: &str, value: &str) -> Result<bool> {
        value
            .parse()
            .map_err(|_| Error::config(format!("{name}={value} must be true or false")))
    }

    /// Refuse a path (`memory://x/y`), for schemes that have none.
    pub fn refuse_path(&self) -> Result<()> {
        if self.path.is_empty() || self.path == "/" {
            return Ok(());
        }
        Err(self.invalid(&format!(
            "{}:// URLs have no path (got {:?})",
            self.scheme, self.path
        )))
    }

    /// Refuse a host list (`a:1,b:2`), for schemes that take one host.
    pub fn refuse_host_list(&self) -> Result<()> {
        if self.authority.contains(',') {
            return Err(self.invalid(&format!("{}:// takes one host", self.scheme)));
        }
        Ok(())
    }

    /// The error for a parameter the backend does not take; `own` lists the ones it does.
    pub fn unknown_param(&self, name: &str, own: &[&str]) -> Error {
        let mut known = COMMON.to_vec();
        known.extend_from_slice(own);
        Error::config(format!(
            "unknown URL parameter {name:?} for {}://: use {}",
            self.scheme,
            known.join(", ")
        ))
    }

    /// A configuration error about this URL (credentials redacted), ending with `what`.
    pub fn invalid(&self, what: &str) -> Error {
        Error::config(format!(
            "invalid courier URL {:?}: {what}",
            redact_url(self.text)
        ))
    }
}
