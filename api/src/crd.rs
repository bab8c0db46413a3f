//! The `WasmFilter` custom resource (`wasmfilter.dev/v1alpha1`, namespaced).
//!
//! These are the CRD types: what a user writes and what `kubectl explain wasmfilter.spec`
//! shows (every doc comment on a field below becomes its description in the generated
//! schema, so they are written for the person applying the YAML). They are distinct from the
//! domain types in the crate root ([`Phase`], [`FailurePolicy`], [`RequestMatch`],
//! [`LabelSelector`], [`FilterLimits`], [`ModuleLocation`]); the conversions at the bottom of
//! this file are the only place the two meet.
//!
//! What the OpenAPI schema cannot say is said with CEL rules (`x-kubernetes-validations`),
//! each with a message that names the field and the fix, so bad input is rejected by the API
//! server at `kubectl apply` instead of surfacing later in a controller log (Envoy Gateway
//! #4379). Every string, list and map a rule looks at has a `maxLength`/`maxItems`/
//! `maxProperties` so the API server can bound the rule's cost when the CRD is installed.
//!
//! Regular expressions in the rules avoid backslashes (`[.]` rather than `\.`) so that they
//! read the same in Rust, in CEL and in the YAML.
//!
//! Checked by the API server but not expressible in the schema, so documented instead:
//! - the size of `config` and `vm.config`: they are free-form JSON (a string, an object, a
//!   list…), `maxProperties` cannot bound a string, and CEL cannot measure the serialized
//!   size of a value. The API server caps the whole object (etcd's request limit, about
//!   1.5 MiB); [`MAX_CONFIG_BYTES`] is the cap the operator applies to the serialized form,
//!   see [`WasmFilterSpec::configuration_bytes`].
//! - the nesting depth of `config` and `vm.config` (at most [`MAX_CONFIG_DEPTH`]): the
//!   operator refuses a deeper one on that WasmFilter alone (operator/src/watch.rs).
//! - IPv6 registry hosts (`[::1]:5000/…`) in `module.image`: the basic reference pattern
//!   does not accept them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
// Used inside the #[x_kube(...)] attributes, which the unused-imports lint does not see into.
#[allow(unused_imports)]
use kube::core::{ListMerge, MapMerge, Reason, Rule};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    FailurePolicy, FilterLimits, LabelRequirement, LabelSelector, ModuleLocation, Phase,
    PluginType, RequestMatch, parse_duration, parse_quantity,
};

/// The largest `config` (or `vm.config`) the operator delivers, serialized: a string as-is,
/// anything else as JSON. See [`WasmFilterSpec::configuration_bytes`].
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// The deepest nesting of arrays and objects accepted in `config` and `vm.config`. The API
/// server admits any depth (no schema or CEL rule can bound a free-form value); the operator
/// refuses a deeper one with an `InvalidSpec` condition, and reads the object's other fields
/// without decoding it whole (serde_json, like most JSON decoders, stops at 128 levels).
pub const MAX_CONFIG_DEPTH: usize = 32;

/// How many failing dataplanes `status.dataplanes.failures` lists at most.
pub const MAX_REPORTED_FAILURES: usize = 10;

/// The desired state of a WasmFilter.
// Each printcolumn(...) repeats the same keys, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wasmfilter.dev",
    version = "v1alpha1",
    kind = "WasmFilter",
    namespaced,
    status = "WasmFilterStatus",
    shortname = "wf",
    category = "wasmfilter",
    derive = "PartialEq",
    doc = "A proxy-wasm HTTP filter: which module (an OCI artifact or a URL pinned by sha256), \
           its configuration, which dataplanes run it (selector), on which requests (match), \
           where in the chain (phase, priority) and what happens when it fails. The operator \
           resolves the module once, verifies and test-compiles it, and pushes it to the \
           selected dataplanes; status says which digest runs where.",
    printcolumn(
        name = "Module",
        type_ = "string",
        description = "The image reference or URL the running module was resolved from",
        json_path = ".status.module.resolvedFrom"
    ),
    printcolumn(
        name = "Digest",
        type_ = "string",
        description = "sha256 of the module bytes the dataplanes run",
        json_path = ".status.module.digest"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        description = "Selected dataplanes that run the current module and configuration",
        json_path = ".status.dataplanes.ready"
    ),
    printcolumn(
        name = "Selected",
        type_ = "integer",
        description = "Connected dataplanes the selector matches",
        json_path = ".status.dataplanes.selected"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        description = "Selected dataplanes that rejected the filter (see status.dataplanes.failures)",
        json_path = ".status.dataplanes.failed",
        priority = 1
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "Where the filter sits in the chain",
        json_path = ".spec.phase",
        priority = 1
    ),
    printcolumn(
        name = "Priority",
        type_ = "integer",
        description = "Order within the phase, higher first",
        json_path = ".spec.priority",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "Why the filter is or is not ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions, transform = no_default_module)]
#[x_kube(validation = Rule::new("has(self.module)")
    .message("module is required: set module.image to an OCI reference such as registry.example/filters/auth:v1, or module.url (an http(s) URL) together with module.sha256")
    .field_path(".module")
    .reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.type) || self.type == 'HTTP' || !has(self.match) || ((!has(self.match.hosts) || size(self.match.hosts) == 0) && (!has(self.match.pathPrefixes) || size(self.match.pathPrefixes) == 0) && (!has(self.match.methods) || size(self.match.methods) == 0))")
    .message("match applies to HTTP filters only: a Network or Service plugin sees no HTTP requests, so remove match (a Network filter chooses TCP listeners with listeners)")
    .field_path(".match")
    .reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("!has(self.listeners) || size(self.listeners) == 0 || (has(self.type) && self.type == 'Network')")
    .message("listeners chooses the dataplanes' TCP listeners of a Network filter: set type: Network, or remove listeners")
    .field_path(".listeners")
    .reason(Reason::FieldValueForbidden))]
pub struct WasmFilterSpec {
    /// Where the .wasm module comes from: exactly one of `image` (an OCI artifact) or `url`
    /// (an http(s) download pinned by `sha256`).
    // Not `required` in the schema (and without a schema default, see no_default_module), so
    // that a WasmFilter without a module is rejected by the CEL rule above, whose message says
    // what to write, instead of the schema's bare "Required value" (which also stops the API
    // server from running any CEL rule). The API server never stores a WasmFilter without it.
    #[serde(default)]
    pub module: ModuleSource,

    /// The proxy-wasm root id: selects the root context in a module that has several.
    /// Empty (the default) selects the module's default root context. At most 256
    /// characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256))]
    pub root_id: String,

    /// Plugin configuration, handed to the module's `proxy_on_configure`: a string is passed
    /// as-is, any other JSON value (object, list, number) is passed serialized as JSON. Not
    /// validated here (the module defines its shape); changing it never re-ships the module.
    /// Its serialized size is capped at 256 KiB, and its nesting at 32 levels, by the
    /// operator (a WasmFilter past either is refused alone, with an InvalidSpec condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_json")]
    pub config: Option<serde_json::Value>,

    /// The VM that runs the module: sharing key, VM configuration and environment.
    #[serde(default, skip_serializing_if = "VmSpec::is_empty")]
    pub vm: VmSpec,

    /// Which dataplanes run this filter, by the labels each dataplane announces. Same syntax
    /// as a Kubernetes label selector; omitted or empty selects every dataplane that
    /// connects to the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "DataplaneSelector")]
    #[x_kube(merge_strategy = MapMerge::Atomic)]
    pub selector: Option<DataplaneSelector>,

    /// Which requests the filter sees. Every non-empty list must match; an omitted or empty
    /// match selects every request.
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "RequestMatchSpec::is_empty"
    )]
    pub matches: RequestMatchSpec,

    /// Where the filter sits in the chain. Phases run in this order: Authn (authentication),
    /// Authz (authorization), Stats (observation), Default (everything else, last). Within a
    /// phase, filters run by priority (higher first), then by namespace/name, so the order
    /// never depends on the order of creation.
    #[serde(default)]
    pub phase: FilterPhase,

    /// Order within the phase: higher runs first. From -1000 to 1000; default 0.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// What a request sees when this filter cannot run (module not loaded, trap, callback
    /// timeout, VM being rebuilt). FailClosed (the default): the request gets a 503, for
    /// filters that guard something. FailOpen: the filter is skipped and the skip counted,
    /// for filters that only observe or decorate. Only this filter is affected, never the
    /// rest of the chain.
    #[serde(default)]
    pub failure_policy: FilterFailurePolicy,

    /// Resource limits of each VM instance of this filter.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// Which traffic the filter sees. HTTP (the default): each HTTP request on the
    /// dataplanes' HTTP listeners that `match` accepts. Network (Istio's NETWORK): each TCP
    /// connection on the dataplanes' TCP listeners named in `listeners`. Service: no traffic;
    /// a root context started once per dataplane process, for ticks, callouts, shared data and
    /// queues shared with the filters of the same `vm.id`.
    #[serde(default, rename = "type")]
    pub plugin_type: FilterType,

    /// Network filters: the names of the dataplanes' TCP listeners they run on; omitted or
    /// empty: every TCP listener. At most 16 names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub listeners: Vec<String>,
}

/// Where the .wasm module comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.image) != has(self.url)")
    .message("module: set exactly one of module.image (an OCI reference such as registry.example/filters/auth:v1) or module.url (an http(s) URL, together with module.sha256)")
    .reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.url) || has(self.sha256)")
    .message("module.sha256 is required with module.url: the sha256 of the .wasm bytes (sha256sum filter.wasm), so that a file changed behind the URL is never run unnoticed")
    .field_path(".sha256")
    .reason(Reason::FieldValueRequired))]
pub struct ModuleSource {
    /// OCI reference of the module: `registry/repository:tag`, `registry/repository@sha256:<digest>`
    /// or both. The registry host is explicit (a name with a dot or a port, or localhost):
    /// there is no implicit docker.io. No scheme (`oci://`). A tag without a digest is
    /// resolved to a digest by the operator, once per spec change (pullPolicy IfNotPresent)
    /// or periodically (Always); dataplanes only ever see digests. Accepted layouts: the CNCF
    /// Wasm artifact (application/wasm layer), Solo's oci and compat images (plugin.wasm),
    /// wasm-to-oci, and a single-layer oras push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 512))]
    #[x_kube(validation = Rule::new("!self.contains('://')")
        .message("module.image is an OCI reference without a scheme, like registry.example/filters/auth:v1 (not oci://...); for an http(s) download use module.url"))]
    #[x_kube(validation = Rule::new("self.contains('://') || self.matches('^(localhost(:[0-9]{1,5})?|[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)+(:[0-9]{1,5})?|[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?:[0-9]{1,5})(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(@sha256:[a-f0-9]{64})?|@sha256:[a-f0-9]{64})$')")
        .message("module.image must be registry/repository:tag or registry/repository@sha256:<64 hex>: an explicit registry host (with a dot or a port, or localhost), a lower-case repository path, then a tag or a digest, like ghcr.io/acme/filters/auth:v1"))]
    pub image: Option<String>,

    /// URL of the .wasm file (http:// or https://), downloaded by the operator (never by the
    /// dataplanes). Requires `sha256`. Plain http is allowed because the sha256 pin, not the
    /// transport, is what guarantees the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?# ]+([/?#][^ ]*)?$')")
        .message("module.url must be an http:// or https:// URL without spaces, like https://example.com/filters/auth.wasm"))]
    pub url: Option<String>,

    /// Expected sha256 of the .wasm module bytes, as 64 lower-case hex characters (the output
    /// of `sha256sum filter.wasm`, without a `sha256:` prefix). One meaning everywhere: the
    /// module bytes, never an OCI manifest or layer digest (those are in status). Required
    /// with `url`; optional with `image`, where a mismatch stops the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[a-f0-9]{64}$')")
        .message("module.sha256 must be exactly 64 lower-case hex characters: the sha256 of the .wasm bytes (sha256sum filter.wasm), without a 'sha256:' prefix"))]
    pub sha256: Option<String>,

    /// Name of a `kubernetes.io/dockerconfigjson` Secret in this WasmFilter's namespace with
    /// the credentials for the registry of `image`. Only the operator reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
        .message("module.pullSecret must be the name of a Secret in this namespace: lower-case letters, digits, '-' and '.', like regcred"))]
    pub pull_secret: Option<String>,

    /// When the operator resolves the tag of `image` to a digest. IfNotPresent (the default):
    /// once per change of the spec; a pushed tag is picked up on the next edit. Always:
    /// also re-resolve periodically (the operator's refresh interval) and roll out a new
    /// digest like any other change. Has no effect on a reference pinned by digest or on `url`.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

/// When the operator resolves an image tag to a digest.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
}

/// The VM a filter's module runs in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    /// VM sharing key: filters in the same namespace with the same id and the same module
    /// digest share one VM per worker (and so share memory and state). Empty (the default):
    /// the filter has its own VM. At most 256 characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256))]
    pub id: String,

    /// VM configuration, handed to the module's `proxy_on_vm_start`: a string as-is, any
    /// other JSON value serialized as JSON. Its serialized size is capped at 256 KiB, and its
    /// nesting at 32 levels, by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_json")]
    pub config: Option<serde_json::Value>,

    /// Environment variables the module sees through WASI, name to value (at most 64). Names
    /// are letters, digits and '_', not starting with a digit. A map, as in the dataplane's
    /// standalone configuration, so a filter moves between the two unchanged. Values are
    /// visible to anyone who can read the WasmFilter: never put secrets here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64), transform = max_value_length::<4096>)]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 128 && k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))")
        .message("vm.env names must be environment variable names of at most 128 characters: letters, digits and '_', not starting with a digit, like LOG_LEVEL"))]
    pub env: BTreeMap<String, String>,
}

impl VmSpec {
    fn is_empty(&self) -> bool {
        self == &VmSpec::default()
    }
}

/// A label selector over dataplanes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSelector {
    /// Labels a dataplane must carry, key to exact value (at most 32).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32), transform = max_value_length::<63>)]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))")
        .message("selector.matchLabels keys must be label keys: an optional DNS-subdomain prefix and '/', then a name of at most 63 letters, digits, '-', '_' or '.' that starts and ends with a letter or digit, like gateway or app.kubernetes.io/name"))]
    #[x_kube(validation = Rule::new("self.all(k, self[k].matches('^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$'))")
        .message("selector.matchLabels values must be label values: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, or empty"))]
    pub match_labels: BTreeMap<String, String>,

    /// Label requirements a dataplane must meet, all of them (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One label requirement: a key, an operator and (for In and NotIn) values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)")
    .message("selector.matchExpressions: operators In and NotIn need at least one value; Exists and DoesNotExist take no values")
    .field_path(".values"))]
pub struct SelectorRequirement {
    /// The label key the requirement applies to, like `gateway` or `app.kubernetes.io/name`.
    #[schemars(length(max = 317))]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$')")
        .message("selector.matchExpressions[].key must be a label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 letters, digits, '-', '_' or '.' that starts and ends with a letter or digit"))]
    pub key: String,

    /// How the key's value is tested: In (the value is one of `values`), NotIn (the label is
    /// absent or its value is none of `values`), Exists (the label is present), DoesNotExist
    /// (the label is absent).
    pub operator: SelectorOperator,

    /// The values for In and NotIn (at least one); empty for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[x_kube(validation = Rule::new("self.all(v, v.matches('^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$'))")
        .message("selector.matchExpressions[].values must be label values: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Which requests a filter sees.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatchSpec {
    /// Hosts (the request's :authority or Host, compared without the port or a trailing dot
    /// and ignoring case), written lower-case in Envoy's forms: an exact name like
    /// `api.example.com`; `*` (any host); a suffix wildcard like `*.example.com` (any
    /// subdomain, not example.com itself) or `*-edge.example.com`; a prefix wildcard like
    /// `api.*` or `api-*`. A `*` stands for at least one character. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(h, h.matches('^([*]|[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*|[*]([.][a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*|[-a-z0-9]*[a-z0-9]([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*)|([a-z0-9]([-a-z0-9]*[a-z0-9])?[.])*([a-z0-9][-a-z0-9]*)?[*])$'))")
        .message("match.hosts: each host must be a lower-case DNS name without a port, exact or with one '*' alone, first or last, like api.example.com, *, *.example.com, *-edge.example.com or api.*"))]
    pub hosts: Vec<String>,

    /// Path prefixes, each starting with '/', like `/api/v1`. A prefix matches by string
    /// prefix (so `/api` also matches `/apis`). At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 1024)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^/[^?# ]*$'))")
        .message("match.pathPrefixes: each prefix must start with '/' and contain no '?', '#' or space, like /api/v1"))]
    pub path_prefixes: Vec<String>,

    /// HTTP methods, upper-case, like GET or POST. At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 32)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(m, m.matches('^[A-Z]+(-[A-Z]+)*$'))")
        .message("match.methods: each method must be an upper-case HTTP method, like GET or POST"))]
    pub methods: Vec<String>,
}

impl RequestMatchSpec {
    fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.path_prefixes.is_empty() && self.methods.is_empty()
    }
}

/// Where a filter sits in the chain.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FilterPhase {
    Authn,
    Authz,
    Stats,
    #[default]
    Default,
}

/// What a request sees when its filter cannot run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FilterFailurePolicy {
    #[default]
    FailClosed,
    FailOpen,
}

/// Which traffic a filter sees.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FilterType {
    #[default]
    HTTP,
    Network,
    Service,
}

/// Resource limits of each VM instance of a filter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Cap on the linear memory of each VM instance: a whole number of bytes with an
    /// optional Ki, Mi or Gi suffix, from 1Mi to 1Gi; default 64Mi. A module that grows past
    /// it fails its allocation (and usually traps, which applies failurePolicy).
    #[serde(default = "default_memory")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,10}(Ki|Mi|Gi)?$')")
        .message("limits.memory must be a whole number of bytes with an optional Ki, Mi or Gi suffix, like 64Mi"))]
    #[x_kube(validation = Rule::new("!self.matches('^[0-9]{1,10}(Ki|Mi|Gi)?$') || (quantity(self).compareTo(quantity('1Mi')) >= 0 && quantity(self).compareTo(quantity('1Gi')) <= 0)")
        .message("limits.memory must be between 1Mi and 1Gi"))]
    pub memory: String,

    /// Wall-clock budget of one proxy-wasm callback: a whole number with the unit ms, s or
    /// m, from 1ms to 60s; default 100ms. A callback that runs longer is interrupted, which
    /// applies failurePolicy.
    #[serde(default = "default_callback_timeout")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,6}(ms|s|m)$')")
        .message("limits.callbackTimeout must be a whole number with the unit ms, s or m, like 100ms or 2s"))]
    #[x_kube(validation = Rule::new("!self.matches('^[0-9]{1,6}(ms|s|m)$') || (duration(self) >= duration('1ms') && duration(self) <= duration('60s'))")
        .message("limits.callbackTimeout must be between 1ms and 60s"))]
    pub callback_timeout: String,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            memory: default_memory(),
            callback_timeout: default_callback_timeout(),
        }
    }
}

fn default_memory() -> String {
    "64Mi".into()
}

fn default_callback_timeout() -> String {
    "100ms".into()
}

/// The observed state of a WasmFilter, written by the operator only.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = unwrap_descriptions)]
pub struct WasmFilterStatus {
    /// The metadata.generation this status describes. When it is lower than
    /// metadata.generation, the operator has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The module the selected dataplanes are told to run: the last one that resolved,
    /// verified and compiled. While a newer spec fails, this keeps describing the last good
    /// module (and the Ready condition says why the new one is not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ResolvedModule>,

    /// How the rollout to the selected dataplanes stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplanes: Option<DataplaneStatus>,

    /// What the dataplanes running this filter report about it, summed over them. Rewritten
    /// when the figures change state (the number of reporting dataplanes, the first trap,
    /// fail-closed refusal or VM restart, failures reaching or leaving 1% of invocations), at
    /// most once per the operator's --status-stats-interval (60 s by default); a change of the
    /// rollout or of a condition is written at once and carries the latest figures. Growing
    /// counters alone are not written: the operator's /metrics has every figure per filter,
    /// current. Counts are totals since each reporting dataplane started running the filter, so
    /// they drop when a dataplane restarts or leaves. Absent while no dataplane reports the
    /// filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ReportedStats>,

    /// Conditions, by type: Resolved (the module was fetched and matches its sha256),
    /// Ready (every selected dataplane runs the current module and configuration) and
    /// Degraded (some selected dataplanes rejected it, or a newer spec is not deployable
    /// while an older module keeps running). Reasons are CamelCase words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), transform = conditions_list_map)]
    pub conditions: Vec<Condition>,
}

/// A resolved module.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedModule {
    /// sha256 of the module bytes, as `sha256:<64 hex>`: the identity dataplanes fetch,
    /// cache and report.
    pub digest: String,

    /// For an OCI image: the digest of the manifest the module was read from
    /// (`sha256:<64 hex>`), which is what `crane digest` or a registry UI shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,

    /// The image reference (with the tag as written) or the URL the module was resolved from.
    pub resolved_from: String,

    /// Size of the module in bytes.
    pub size: i64,
}

/// Rollout counts over the selected dataplanes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneStatus {
    /// Connected dataplanes whose labels the selector matches.
    pub selected: i32,

    /// Selected dataplanes that acknowledged the current module and configuration.
    pub ready: i32,

    /// Selected dataplanes that rejected the current module or configuration (they keep
    /// running their last good version of this filter).
    pub failed: i32,

    /// Some of the failing dataplanes, with their error: at most 10, sorted by dataplane,
    /// so the list stays readable and status writes stay small on a large fleet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub failures: Vec<DataplaneFailure>,
}

/// A filter's figures, summed over the dataplanes that report it. Counts are totals since
/// each reporting dataplane started running the filter: they drop when a dataplane restarts or
/// stops reporting (it left, or no longer runs the filter).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReportedStats {
    /// Dataplanes whose latest report (sent every few seconds) includes this filter.
    pub dataplanes: i32,

    /// Requests the filter ran on.
    pub invocations: i64,

    /// Traps and callback timeouts: each one failed the request it happened on, by the
    /// filter's failurePolicy.
    pub traps: i64,

    /// Requests that skipped this filter because it could not run (failurePolicy FailOpen).
    pub fail_open_skips: i64,

    /// Requests refused with a 503 because this filter could not run (failurePolicy
    /// FailClosed).
    pub fail_closed: i64,

    /// VMs of this filter rebuilt after a failure.
    pub vm_restarts: i64,

    /// Mean wall-clock time of one proxy-wasm callback of this filter, as a duration like
    /// 152µs, 1.5ms or 2.00s. Absent while no callback has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_callback_latency: Option<String>,

    /// When the operator last wrote these figures.
    pub updated_at: Time,
}

/// One dataplane's rejection.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneFailure {
    /// The dataplane's id (usually its node or pod name).
    pub dataplane: String,

    /// What the dataplane reported (compile error, proxy_on_configure returned false, …),
    /// truncated to 1024 characters.
    pub message: String,
}

// ---- schema helpers -------------------------------------------------------------------

/// Any JSON value (string, object, list, number, boolean), kept as written: the structural
/// schema way of saying "free-form".
fn free_form_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Doc comments are wrapped at 100 columns; `kubectl explain` wraps descriptions itself, so
/// the line breaks inside a paragraph become spaces (blank lines stay paragraph breaks).
fn unwrap_descriptions(schema: &mut schemars::Schema) {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    match v {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = text
                                .split("\n\n")
                                .map(|paragraph| paragraph.replace('\n', " "))
                                .collect::<Vec<_>>()
                                .join("\n\n");
                        }
                        _ => walk(v),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    if let Some(map) = schema.as_object_mut() {
        map.values_mut().for_each(walk);
        if let Some(serde_json::Value::String(text)) = map.get_mut("description") {
            *text = text.replace('\n', " ");
        }
    }
}

/// `module` has a serde default (so it is not `required`), but no schema default: the API
/// server checks defaults against the CEL rules when the CRD is installed, and an empty
/// module fails the "exactly one of image or url" rule.
fn no_default_module(schema: &mut schemars::Schema) {
    if let Some(module) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("module"))
        .and_then(|m| m.as_object_mut())
    {
        module.remove("default");
    }
}

/// Bounds the values of a string map, so CEL rules over them have a bounded cost.
fn max_value_length<const N: u64>(schema: &mut schemars::Schema) {
    if let Some(values) = schema
        .get_mut("additionalProperties")
        .and_then(|v| v.as_object_mut())
    {
        values.insert("maxLength".into(), N.into());
    }
}

/// metav1.Condition lists are maps keyed by type (one condition per type), as in every
/// built-in API, so server-side apply merges them by type.
fn conditions_list_map(schema: &mut schemars::Schema) {
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
}

// ---- conversions into the domain types --------------------------------------------------

/// A spec that cannot be converted into domain types. Only objects that bypassed the API
/// server's validation (tests, a CRD older than the operator) produce these; `field` is the
/// path under `spec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spec.{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

fn spec_error(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

impl From<FilterPhase> for Phase {
    fn from(p: FilterPhase) -> Phase {
        match p {
            FilterPhase::Authn => Phase::Authn,
            FilterPhase::Authz => Phase::Authz,
            FilterPhase::Stats => Phase::Stats,
            FilterPhase::Default => Phase::Default,
        }
    }
}

impl From<FilterType> for PluginType {
    fn from(t: FilterType) -> PluginType {
        match t {
            FilterType::HTTP => PluginType::HTTP,
            FilterType::Network => PluginType::Network,
            FilterType::Service => PluginType::Service,
        }
    }
}

impl From<FilterFailurePolicy> for FailurePolicy {
    fn from(p: FilterFailurePolicy) -> FailurePolicy {
        match p {
            FilterFailurePolicy::FailClosed => FailurePolicy::FailClosed,
            FilterFailurePolicy::FailOpen => FailurePolicy::FailOpen,
        }
    }
}

impl From<&RequestMatchSpec> for RequestMatch {
    fn from(m: &RequestMatchSpec) -> RequestMatch {
        RequestMatch {
            hosts: m.hosts.clone(),
            path_prefixes: m.path_prefixes.clone(),
            methods: m.methods.clone(),
        }
    }
}

impl TryFrom<&LimitsSpec> for FilterLimits {
    type Error = SpecError;

    fn try_from(l: &LimitsSpec) -> Result<FilterLimits, SpecError> {
        let memory_bytes = parse_quantity(&l.memory).map_err(|m| spec_error("limits.memory", m))?;
        if !(1 << 20..=1 << 30).contains(&memory_bytes) {
            return Err(spec_error(
                "limits.memory",
                format!("{} is out of range: between 1Mi and 1Gi", l.memory),
            ));
        }
        let callback_timeout = parse_duration(&l.callback_timeout)
            .map_err(|m| spec_error("limits.callbackTimeout", m))?;
        if callback_timeout.is_zero() || callback_timeout > std::time::Duration::from_secs(60) {
            return Err(spec_error(
                "limits.callbackTimeout",
                format!(
                    "{} is out of range: between 1ms and 60s",
                    l.callback_timeout
                ),
            ));
        }
        Ok(FilterLimits {
            memory_bytes,
            callback_timeout,
        })
    }
}

impl TryFrom<&DataplaneSelector> for LabelSelector {
    type Error = SpecError;

    fn try_from(s: &DataplaneSelector) -> Result<LabelSelector, SpecError> {
        let match_expressions = s
            .match_expressions
            .iter()
            .map(|e| {
                let key = e.key.clone();
                let values = e.values.clone();
                match e.operator {
                    SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => {
                        Err(spec_error(
                            "selector.matchExpressions",
                            format!("{key}: In and NotIn need at least one value"),
                        ))
                    }
                    SelectorOperator::Exists | SelectorOperator::DoesNotExist
                        if !values.is_empty() =>
                    {
                        Err(spec_error(
                            "selector.matchExpressions",
                            format!("{key}: Exists and DoesNotExist take no values"),
                        ))
                    }
                    SelectorOperator::In => Ok(LabelRequirement::In(key, values)),
                    SelectorOperator::NotIn => Ok(LabelRequirement::NotIn(key, values)),
                    SelectorOperator::Exists => Ok(LabelRequirement::Exists(key)),
                    SelectorOperator::DoesNotExist => Ok(LabelRequirement::DoesNotExist(key)),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(LabelSelector {
            match_labels: s.match_labels.clone(),
            match_expressions,
        })
    }
}

impl TryFrom<&ModuleSource> for ModuleLocation {
    type Error = SpecError;

    fn try_from(m: &ModuleSource) -> Result<ModuleLocation, SpecError> {
        match (&m.image, &m.url) {
            (Some(image), None) => Ok(ModuleLocation::Image {
                reference: image.clone(),
                pull_secret: m.pull_secret.clone(),
                always_pull: m.pull_policy == PullPolicy::Always,
                sha256: m.sha256.clone(),
            }),
            (None, Some(url)) => {
                let sha256 = m
                    .sha256
                    .clone()
                    .ok_or_else(|| spec_error("module.sha256", "required with module.url"))?;
                Ok(ModuleLocation::Url {
                    url: url.clone(),
                    sha256,
                })
            }
            _ => Err(spec_error(
                "module",
                "set exactly one of module.image or module.url",
            )),
        }
    }
}

impl WasmFilterSpec {
    /// The selector as a domain selector; an omitted selector selects every dataplane.
    pub fn label_selector(&self) -> Result<LabelSelector, SpecError> {
        self.selector
            .as_ref()
            .map_or(Ok(LabelSelector::default()), LabelSelector::try_from)
    }

    /// The bytes handed to `proxy_on_configure`: a string as-is, any other value as JSON,
    /// nothing when `config` is omitted. Errors beyond [`MAX_CONFIG_BYTES`].
    pub fn configuration_bytes(&self) -> Result<Vec<u8>, SpecError> {
        configuration_bytes("config", self.config.as_ref())
    }

    /// The bytes handed to `proxy_on_vm_start`, with the same rules as
    /// [`configuration_bytes`](Self::configuration_bytes).
    pub fn vm_configuration_bytes(&self) -> Result<Vec<u8>, SpecError> {
        configuration_bytes("vm.config", self.vm.config.as_ref())
    }
}

fn configuration_bytes(
    field: &'static str,
    value: Option<&serde_json::Value>,
) -> Result<Vec<u8>, SpecError> {
    if let Some(v) = value {
        let depth = json_depth(v);
        if depth > MAX_CONFIG_DEPTH {
            return Err(spec_error(
                field,
                format!(
                    "is nested {depth} levels deep; at most {MAX_CONFIG_DEPTH} are accepted: \
                     flatten it, or pass the configuration as a JSON string"
                ),
            ));
        }
    }
    let bytes = match value {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(v) => serde_json::to_vec(v).map_err(|e| spec_error(field, e.to_string()))?,
    };
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(spec_error(
            field,
            format!(
                "is {} bytes serialized; at most {MAX_CONFIG_BYTES} (256 KiB) are delivered to a module",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Nesting of arrays and objects: a scalar is 0, `{}` and `[]` are 1. Iterative, so a value
/// of any depth is measured without exhausting the stack.
fn json_depth(value: &serde_json::Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(items) => Box::new(items.iter()),
            serde_json::Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        max = max.max(depth + 1);
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    max
}

/// The CRD as the YAML file `crds/wasmfilter.yaml` holds it (and `crdgen` prints).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_yaml_ng::to_string(&WasmFilter::crd()).expect("the CRD serializes to YAML");
    format!(
        "# Generated by `cargo run -p wasmfilter-api --bin crdgen -- --write` from api/src/crd.rs.\n\
         # Do not edit: change the Rust types and regenerate (a test fails on drift).\n{yaml}"
    )
}
