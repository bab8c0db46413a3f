//! Properties: typed values, their wire encoding, and the well-known names.
//!
//! Encoding (Envoy `serializeValue`): strings and bytes raw, integers 8 bytes LE, bools one byte,
//! timestamps and durations as i64 nanoseconds, maps in the pairs format with values encoded
//! recursively, lists in the pairs format with the items in the key slot.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::pairs::{Fields, serialize_iter};

/// A property value. Route and cluster metadata are `Map`s of these.
#[derive(Clone, Debug, PartialEq)]
pub enum PropertyValue {
    String(String),
    Bytes(Vec<u8>),
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    Timestamp(SystemTime),
    Duration(Duration),
    Map(BTreeMap<String, PropertyValue>),
    List(Vec<PropertyValue>),
}

impl PropertyValue {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            PropertyValue::String(s) => s.as_bytes().to_vec(),
            PropertyValue::Bytes(b) => b.clone(),
            PropertyValue::Int(i) => i.to_le_bytes().to_vec(),
            PropertyValue::UInt(u) => u.to_le_bytes().to_vec(),
            PropertyValue::Double(d) => d.to_le_bytes().to_vec(),
            PropertyValue::Bool(b) => vec![u8::from(*b)],
            PropertyValue::Timestamp(t) => {
                let nanos = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as i64)
                    .unwrap_or(0);
                nanos.to_le_bytes().to_vec()
            }
            PropertyValue::Duration(d) => (d.as_nanos() as i64).to_le_bytes().to_vec(),
            PropertyValue::Map(map) => {
                let encoded: Vec<(Vec<u8>, Vec<u8>)> = map
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.encode()))
                    .collect();
                serialize_iter(encoded.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            }
            PropertyValue::List(items) => {
                let encoded: Vec<Vec<u8>> = items.iter().map(PropertyValue::encode).collect();
                serialize_iter(encoded.iter().map(|v| (v.as_slice(), &[][..])))
            }
        }
    }

    /// Walks one path segment into this value: a key of a map, a decimal index of a list.
    fn child(&self, segment: &str) -> Option<&PropertyValue> {
        match self {
            PropertyValue::Map(map) => map.get(segment),
            PropertyValue::List(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
    }

    /// Converts JSON (as written in a filter or route configuration) into a property value.
    pub fn from_json(value: &serde_json::Value) -> PropertyValue {
        use serde_json::Value;
        match value {
            Value::Null => PropertyValue::String(String::new()),
            Value::Bool(b) => PropertyValue::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    PropertyValue::Int(i)
                } else if let Some(u) = n.as_u64() {
                    PropertyValue::UInt(u)
                } else {
                    PropertyValue::Double(n.as_f64().unwrap_or(0.0))
                }
            }
            Value::String(s) => PropertyValue::String(s.clone()),
            Value::Array(items) => PropertyValue::List(items.iter().map(Self::from_json).collect()),
            Value::Object(map) => PropertyValue::Map(
                map.iter()
                    .map(|(k, v)| (k.clone(), Self::from_json(v)))
                    .collect(),
            ),
        }
    }
}

fn fields_map(fields: &Fields) -> PropertyValue {
    let mut map = BTreeMap::new();
    for (k, _) in fields.iter() {
        if !map.contains_key(k) {
            let joined = fields.get_joined(k).unwrap_or_default();
            map.insert(k.to_string(), PropertyValue::Bytes(joined));
        }
    }
    PropertyValue::Map(map)
}

/// What the embedder knows about a stream, beyond its headers, for the well-known properties.
#[derive(Clone, Debug, Default)]
pub struct StreamInfo {
    /// "HTTP/1.0", "HTTP/1.1", "HTTP/2".
    pub protocol: String,
    /// "http" or "https".
    pub scheme: String,
    pub source_address: Option<std::net::SocketAddr>,
    pub destination_address: Option<std::net::SocketAddr>,
    pub connection_id: u64,
    pub mtls: bool,
    pub requested_server_name: Option<String>,
    pub start_time: Option<SystemTime>,
    pub route_name: Option<String>,
    pub route_metadata: Option<PropertyValue>,
    pub cluster_name: Option<String>,
    pub cluster_metadata: Option<PropertyValue>,
    pub listener_name: Option<String>,
    pub node_id: Option<String>,
    pub node_metadata: Option<PropertyValue>,
    /// Set once the response has started.
    pub response_code: Option<u16>,
    pub response_code_details: Option<String>,
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub upstream_address: Option<std::net::SocketAddr>,
}

/// The inputs of a property lookup.
pub(crate) struct PropertyScope<'a> {
    pub plugin_name: &'a str,
    pub plugin_root_id: &'a str,
    pub plugin_vm_id: &'a str,
    pub stream: Option<(&'a StreamInfo, &'a Fields, &'a Fields, &'a Fields)>,
    pub filter_state: Option<&'a BTreeMap<String, Vec<u8>>>,
}

/// The outcome of a property lookup.
pub(crate) enum Lookup {
    Found(Vec<u8>),
    NotFound,
}

/// Resolves `path` (already split into segments) against the well-known names, then the
/// values set by `proxy_set_property`.
pub(crate) fn lookup(scope: &PropertyScope<'_>, path: &[String]) -> Lookup {
    if path.is_empty() {
        return Lookup::NotFound;
    }
    let joined = path.join("\0");
    if let Some(state) = scope.filter_state
        && let Some(v) = state.get(&joined)
    {
        return Lookup::Found(v.clone());
    }
    let head = path[0].as_str();
    let rest = &path[1..];
    let root: Option<PropertyValue> = match head {
        "plugin_name" => Some(PropertyValue::String(scope.plugin_name.to_string())),
        "plugin_root_id" => Some(PropertyValue::String(scope.plugin_root_id.to_string())),
        "plugin_vm_id" => Some(PropertyValue::String(scope.plugin_vm_id.to_string())),
        _ => None,
    };
    if let Some(value) = root {
        return walk(&value, rest);
    }
    let Some((info, req, resp, resp_trailers)) = scope.stream else {
        return Lookup::NotFound;
    };
    let value = match head {
        "request" => request_value(info, req, rest.first().map(String::as_str)),
        "response" => response_value(info, resp, resp_trailers, rest.first().map(String::as_str)),
        "source" => address_value(info.source_address, rest.first().map(String::as_str)),
        "destination" => address_value(info.destination_address, rest.first().map(String::as_str)),
        "upstream" => address_value(info.upstream_address, rest.first().map(String::as_str)),
        "connection" => connection_value(info, rest.first().map(String::as_str)),
        "xds" => {
            return match rest.first().map(String::as_str) {
                Some(name) => match metadata_value(info, name) {
                    Some(v) => walk(&v, &rest[1..]),
                    None => Lookup::NotFound,
                },
                None => Lookup::NotFound,
            };
        }
        other => {
            // Legacy top-level names (`route_metadata`, `cluster_name`, `node`, ...).
            return match metadata_value(info, other) {
                Some(v) => walk(&v, rest),
                None => Lookup::NotFound,
            };
        }
    };
    match value {
        // The first segment after the head was consumed by the resolver above.
        Some(v) => walk(&v, rest.get(1..).unwrap_or(&[])),
        None => Lookup::NotFound,
    }
}

fn walk(value: &PropertyValue, rest: &[String]) -> Lookup {
    let mut current = value;
    for segment in rest {
        match current.child(segment) {
            Some(next) => current = next,
            None => return Lookup::NotFound,
        }
    }
    Lookup::Found(current.encode())
}

fn string(s: impl Into<String>) -> PropertyValue {
    PropertyValue::String(s.into())
}

fn request_value(info: &StreamInfo, req: &Fields, field: Option<&str>) -> Option<PropertyValue> {
    let header = |name: &str| req.get_str(name).map(PropertyValue::String);
    match field? {
        "path" => header(":path"),
        "url_path" => req
            .get_str(":path")
            .map(|p| string(p.split('?').next().unwrap_or_default())),
        "query" => req
            .get_str(":path")
            .map(|p| string(p.split_once('?').map(|(_, q)| q).unwrap_or_default())),
        "host" => header(":authority").or_else(|| header("host")),
        "scheme" => header(":scheme").or_else(|| Some(string(info.scheme.clone()))),
        "method" => header(":method"),
        "headers" => Some(fields_map(req)),
        "referer" => header("referer"),
        "useragent" => header("user-agent"),
        "id" => header("x-request-id"),
        "protocol" => Some(string(info.protocol.clone())),
        "time" => info.start_time.map(PropertyValue::Timestamp),
        "duration" => info
            .start_time
            .and_then(|t| t.elapsed().ok())
            .map(PropertyValue::Duration),
        "size" => Some(PropertyValue::Int(info.request_body_bytes as i64)),
        "total_size" => Some(PropertyValue::Int(
            (info.request_body_bytes as usize + req.byte_size()) as i64,
        )),
        "headers_bytes" => Some(PropertyValue::Int(req.byte_size() as i64)),
        _ => None,
    }
}

fn response_value(
    info: &StreamInfo,
    resp: &Fields,
    trailers: &Fields,
    field: Option<&str>,
) -> Option<PropertyValue> {
    match field? {
        "code" => info
            .response_code
            .map(|c| PropertyValue::Int(i64::from(c)))
            .or_else(|| {
                resp.get_str(":status")
                    .and_then(|s| s.parse::<i64>().ok())
                    .map(PropertyValue::Int)
            }),
        "code_details" => info.response_code_details.clone().map(string),
        "flags" => Some(PropertyValue::Int(0)),
        "grpc_status" => resp
            .get_str("grpc-status")
            .or_else(|| trailers.get_str("grpc-status"))
            .and_then(|s| s.parse::<i64>().ok())
            .map(PropertyValue::Int),
        "headers" => Some(fields_map(resp)),
        "trailers" => Some(fields_map(trailers)),
        "size" => Some(PropertyValue::Int(info.response_body_bytes as i64)),
        "total_size" => Some(PropertyValue::Int(
            (info.response_body_bytes as usize + resp.byte_size()) as i64,
        )),
        "headers_bytes" => Some(PropertyValue::Int(resp.byte_size() as i64)),
        _ => None,
    }
}

fn address_value(addr: Option<std::net::SocketAddr>, field: Option<&str>) -> Option<PropertyValue> {
    let addr = addr?;
    match field? {
        "address" => Some(string(addr.to_string())),
        "port" => Some(PropertyValue::Int(i64::from(addr.port()))),
        _ => None,
    }
}

fn connection_value(info: &StreamInfo, field: Option<&str>) -> Option<PropertyValue> {
    match field? {
        "id" => Some(PropertyValue::UInt(info.connection_id)),
        "mtls" => Some(PropertyValue::Bool(info.mtls)),
        "requested_server_name" => info.requested_server_name.clone().map(string),
        _ => None,
    }
}

fn metadata_value(info: &StreamInfo, name: &str) -> Option<PropertyValue> {
    match name {
        "route_name" => info.route_name.clone().map(string),
        "route_metadata" => info.route_metadata.clone(),
        "cluster_name" => info.cluster_name.clone().map(string),
        "cluster_metadata" => info.cluster_metadata.clone(),
        "listener_name" | "filter_chain_name" => info.listener_name.clone().map(string),
        "listener_direction" => Some(PropertyValue::Int(1)),
        "node" => {
            let mut map = BTreeMap::new();
            if let Some(id) = &info.node_id {
                map.insert("id".to_string(), string(id.clone()));
            }
            if let Some(meta) = &info.node_metadata {
                map.insert("metadata".to_string(), meta.clone());
            }
            Some(PropertyValue::Map(map))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope<'a>(info: &'a StreamInfo, req: &'a Fields, empty: &'a Fields) -> PropertyScope<'a> {
        PropertyScope {
            plugin_name: "p",
            plugin_root_id: "",
            plugin_vm_id: "vm",
            stream: Some((info, req, empty, empty)),
            filter_state: None,
        }
    }

    fn get(scope: &PropertyScope<'_>, path: &[&str]) -> Option<Vec<u8>> {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        match lookup(scope, &path) {
            Lookup::Found(v) => Some(v),
            Lookup::NotFound => None,
        }
    }

    #[test]
    fn resolves_request_and_metadata_paths() {
        let info = StreamInfo {
            source_address: Some("127.0.0.1:4000".parse().unwrap()),
            route_name: Some("r1".into()),
            route_metadata: Some(PropertyValue::from_json(&serde_json::json!({
                "filter_metadata": {"wasmfilter": {"owner": "team-a"}}
            }))),
            ..Default::default()
        };
        let req = Fields::from_pairs([(":path", "/a?b=1"), (":method", "GET")]);
        let empty = Fields::new();
        let s = scope(&info, &req, &empty);
        assert_eq!(get(&s, &["request", "path"]).unwrap(), b"/a?b=1");
        assert_eq!(get(&s, &["request", "url_path"]).unwrap(), b"/a");
        assert_eq!(get(&s, &["request", "query"]).unwrap(), b"b=1");
        assert_eq!(get(&s, &["source", "address"]).unwrap(), b"127.0.0.1:4000");
        assert_eq!(get(&s, &["source", "port"]).unwrap(), 4000i64.to_le_bytes());
        assert_eq!(get(&s, &["plugin_root_id"]).unwrap(), b"");
        assert_eq!(
            get(
                &s,
                &[
                    "xds",
                    "route_metadata",
                    "filter_metadata",
                    "wasmfilter",
                    "owner"
                ]
            )
            .unwrap(),
            b"team-a"
        );
        assert_eq!(
            get(
                &s,
                &["route_metadata", "filter_metadata", "wasmfilter", "owner"]
            )
            .unwrap(),
            b"team-a"
        );
        assert_eq!(get(&s, &["xds", "route_name"]).unwrap(), b"r1");
        assert!(get(&s, &["request", "nope"]).is_none());
        assert!(get(&s, &["nothing"]).is_none());
    }

    #[test]
    fn lists_put_items_in_the_key_slot() {
        let v = PropertyValue::List(vec![string("a"), string("bc")]);
        assert_eq!(
            v.encode(),
            crate::pairs::serialize(&Fields::from_pairs([("a", ""), ("bc", "")]))
        );
    }
}
