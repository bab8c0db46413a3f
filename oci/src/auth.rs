//! Registry credentials, and reading them out of a `kubernetes.io/dockerconfigjson` Secret.

use base64::Engine as _;

/// How to authenticate to a registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl Credentials {
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    pub(crate) fn to_registry_auth(&self) -> oci_client::secrets::RegistryAuth {
        match self {
            Credentials::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DockerConfigError {
    #[error("the .dockerconfigjson is not valid JSON: {0}")]
    Json(String),
    #[error("the .dockerconfigjson has no \"auths\" object")]
    NoAuths,
    #[error("the .dockerconfigjson entry for {registry}: {reason}")]
    BadEntry { registry: String, reason: String },
}

/// The registry part of a `.dockerconfigjson` key: scheme and path dropped, lowercased
/// (`https://Host:5000/v2/` → `host:5000`).
fn normalize_registry(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or("").to_ascii_lowercase()
}

/// The credentials a `.dockerconfigjson` (the data of a `kubernetes.io/dockerconfigjson`
/// Secret) holds for `registry` (`host` or `host:port`, as in an image reference), or `None`
/// when it has no entry for it. An entry gives either `auth` (base64 of `user:password`) or
/// `username` and `password`; `auth` wins when both are present.
pub fn credentials_from_dockerconfigjson(
    json: &[u8],
    registry: &str,
) -> Result<Option<Credentials>, DockerConfigError> {
    let doc: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| DockerConfigError::Json(e.to_string()))?;
    let auths = doc
        .get("auths")
        .and_then(|a| a.as_object())
        .ok_or(DockerConfigError::NoAuths)?;
    let wanted = normalize_registry(registry);
    let Some((key, entry)) = auths.iter().find(|(k, _)| normalize_registry(k) == wanted) else {
        return Ok(None);
    };
    let bad = |reason: &str| DockerConfigError::BadEntry {
        registry: key.clone(),
        reason: reason.to_string(),
    };
    let field = |name: &str| {
        entry
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    if let Some(auth) = field("auth") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(&format!("\"auth\" is not base64: {e}")))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| bad("\"auth\" does not decode to UTF-8"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| bad("\"auth\" does not decode to user:password"))?;
        return Ok(Some(Credentials::basic(user, pass)));
    }
    match (field("username"), field("password")) {
        (Some(u), Some(p)) => Ok(Some(Credentials::basic(u, p))),
        _ if field("identitytoken").is_some() => Err(bad(
            "only \"identitytoken\" is set; identity tokens are not supported, use username and password",
        )),
        _ => Err(bad(
            "neither \"auth\" nor \"username\" and \"password\" is set",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn auth_field_is_decoded() {
        let json = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{}"}}}}}}"#,
            b64("alice:pa:ss")
        );
        assert_eq!(
            credentials_from_dockerconfigjson(json.as_bytes(), "127.0.0.1:5000").unwrap(),
            Some(Credentials::basic("alice", "pa:ss"))
        );
    }

    #[test]
    fn username_and_password_fields_and_key_normalisation() {
        let json = br#"{"auths":{"https://LocalHost:5000/v2/":{"username":"bob","password":"pw"},
                        "127.0.0.1:6000":{"username":"carol","password":"x"}}}"#;
        assert_eq!(
            credentials_from_dockerconfigjson(json, "localhost:5000").unwrap(),
            Some(Credentials::basic("bob", "pw"))
        );
        assert_eq!(
            credentials_from_dockerconfigjson(json, "127.0.0.1:6000").unwrap(),
            Some(Credentials::basic("carol", "x"))
        );
        // The port is part of the registry: no entry for another port.
        assert_eq!(
            credentials_from_dockerconfigjson(json, "localhost").unwrap(),
            None
        );
    }

    #[test]
    fn auth_wins_over_username_and_password() {
        let json = format!(
            r#"{{"auths":{{"localhost":{{"auth":"{}","username":"x","password":"y"}}}}}}"#,
            b64("u:p")
        );
        assert_eq!(
            credentials_from_dockerconfigjson(json.as_bytes(), "localhost").unwrap(),
            Some(Credentials::basic("u", "p"))
        );
    }

    #[test]
    fn malformed_inputs_say_what_is_wrong() {
        assert!(matches!(
            credentials_from_dockerconfigjson(b"not json", "localhost"),
            Err(DockerConfigError::Json(_))
        ));
        assert_eq!(
            credentials_from_dockerconfigjson(br#"{"localhost":{}}"#, "localhost"),
            Err(DockerConfigError::NoAuths)
        );
        let e = credentials_from_dockerconfigjson(
            br#"{"auths":{"localhost":{"auth":"%%%"}}}"#,
            "localhost",
        )
        .unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        let json = format!(
            r#"{{"auths":{{"localhost":{{"auth":"{}"}}}}}}"#,
            b64("nocolon")
        );
        let e = credentials_from_dockerconfigjson(json.as_bytes(), "localhost").unwrap_err();
        assert!(e.to_string().contains("user:password"), "{e}");
        let e = credentials_from_dockerconfigjson(
            br#"{"auths":{"localhost":{"identitytoken":"t"}}}"#,
            "localhost",
        )
        .unwrap_err();
        assert!(e.to_string().contains("identity tokens"), "{e}");
        let e = credentials_from_dockerconfigjson(br#"{"auths":{"localhost":{}}}"#, "localhost")
            .unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
    }

    #[test]
    fn debug_redacts_the_password() {
        let s = format!("{:?}", Credentials::basic("u", "secret"));
        assert!(!s.contains("secret"), "{s}");
    }
}
