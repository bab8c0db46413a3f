//! The list-watch of WasmFilters the controller runs on, decoding each object on its own.
//!
//! kube-runtime's watcher decodes a whole List in one `serde_json` call, and serde_json's
//! recursion limit (128 levels) applies to the List. `spec.config` is free-form JSON the API
//! server admits at any depth (no structural or CEL rule can bound it), so one WasmFilter
//! nested 200 levels deep makes every list fail and every watch event for it fail the watch:
//! the operator goes blind for every namespace. Here a list or a watch event is split into
//! objects without building them (serde_json's `RawValue` skips a value iteratively, at any
//! depth), and each object is decoded alone:
//!
//! - an object that decodes is passed on as it is;
//! - an object whose `spec.config` or `spec.vm.config` nests deeper than
//!   [`MAX_CONFIG_DEPTH`] is passed on with that field emptied, and [`SpecNotes`] records why
//!   under its uid, so the controller refuses it with an `InvalidSpec` condition and an Event
//!   like any other invalid spec (its `managedFields`, which mirror the config's shape, are
//!   dropped, the controller never reads them);
//! - an object that still cannot be read is logged, counted and skipped; the others go on.
//!
//! The stream has the shape of `kube::runtime::watcher` (Init, InitApply…, InitDone, then
//! Apply/Delete), so the reflector, the controller and `default_backoff` work on it as on
//! kube's. A watch restarts from the last resourceVersion (bookmarks keep it fresh) and
//! relists when the API server answers 410 Gone.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::{AsyncBufReadExt, Stream, StreamExt};
use kube::api::{ListParams, WatchParams};
use kube::core::{Request, Status};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use wasmfilter_api::crd::{MAX_CONFIG_DEPTH, WasmFilter};

/// Objects per list page.
const PAGE_SIZE: u32 = 500;
/// How long one watch request lasts before it is renewed (the API server's own cap is
/// about 30 minutes; shorter keeps a silently dead connection from lasting).
const WATCH_TIMEOUT_SECS: u32 = 290;
/// Objects nested at most this deep are decoded at once; deeper ones (within serde_json's
/// limit of 128, with the List's own levels and `managedFields` on top) are taken apart.
const DIRECT_DECODE_DEPTH: usize = 100;

/// Why an object's spec was partly unreadable, by uid: the watch writes, the controller
/// reads. An entry describes the latest version of the object the watch decoded.
#[derive(Debug, Default)]
pub struct SpecNotes(Mutex<HashMap<String, String>>);

impl SpecNotes {
    /// The problem with the latest decoded version of the object with this uid, if any.
    pub fn problem(&self, uid: &str) -> Option<String> {
        self.0.lock().unwrap().get(uid).cloned()
    }

    fn set(&self, uid: &str, problem: Option<String>) {
        let mut notes = self.0.lock().unwrap();
        match problem {
            Some(p) => notes.insert(uid.to_string(), p),
            None => notes.remove(uid),
        };
    }
}

type Event = Result<watcher::Event<WasmFilter>, watcher::Error>;
type Lines = Pin<Box<dyn Stream<Item = std::io::Result<String>> + Send>>;

enum Phase {
    List,
    StartWatch,
    Watching(Lines),
}

/// What the watch tells its owner besides the events.
#[derive(Clone)]
pub struct Hooks {
    /// Where partly unreadable specs are noted.
    pub notes: Arc<SpecNotes>,
    /// Called with a description of each object that could not be read at all.
    pub on_skip: Arc<dyn Fn(&str) + Send + Sync>,
    /// Called after each request to the API server (list page, watch start, watch line) with
    /// whether it got an answer.
    pub on_reachable: Arc<dyn Fn(bool) + Send + Sync>,
}

struct State {
    client: Client,
    hooks: Hooks,
    phase: Phase,
    resource_version: String,
    queue: VecDeque<Event>,
}

/// Every WasmFilter in every namespace, as watcher events.
pub fn wasmfilters(client: Client, hooks: Hooks) -> impl Stream<Item = Event> + Send + 'static {
    let state = State {
        client,
        hooks,
        phase: Phase::List,
        resource_version: String::new(),
        queue: VecDeque::new(),
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.queue.pop_front() {
                return Some((event, st));
            }
            let phase = std::mem::replace(&mut st.phase, Phase::StartWatch);
            let step = match phase {
                Phase::List => match list(&st.client, &st.hooks).await {
                    Ok((objects, rv)) => {
                        st.resource_version = rv;
                        st.queue.push_back(Ok(watcher::Event::Init));
                        st.queue.extend(
                            objects
                                .into_iter()
                                .map(|o| Ok(watcher::Event::InitApply(o))),
                        );
                        st.queue.push_back(Ok(watcher::Event::InitDone));
                        None
                    }
                    Err(e) => {
                        st.phase = Phase::List;
                        Some(Err(watcher::Error::InitialListFailed(e)))
                    }
                },
                Phase::StartWatch => match start_watch(&st.client, &st.resource_version).await {
                    Ok(lines) => {
                        st.phase = Phase::Watching(lines);
                        None
                    }
                    Err(e) => {
                        if is_gone(&e) {
                            st.phase = Phase::List;
                        }
                        Some(Err(watcher::Error::WatchStartFailed(e)))
                    }
                },
                Phase::Watching(mut lines) => match lines.next().await {
                    // The watch request ended (its timeout): renew it from where it was.
                    None => None,
                    Some(Err(e)) => {
                        Some(Err(watcher::Error::WatchFailed(kube::Error::ReadEvents(e))))
                    }
                    Some(Ok(line)) => {
                        st.phase = Phase::Watching(lines);
                        watch_event(&mut st, &line)
                    }
                },
            };
            let reachable = !matches!(
                step,
                Some(Err(watcher::Error::InitialListFailed(_)
                    | watcher::Error::WatchStartFailed(_)
                    | watcher::Error::WatchFailed(_)))
            );
            (st.hooks.on_reachable)(reachable);
            if let Some(event) = step {
                return Some((event, st));
            }
        }
    })
}

async fn list(client: &Client, hooks: &Hooks) -> Result<(Vec<WasmFilter>, String), kube::Error> {
    #[derive(Deserialize)]
    struct RawList<'a> {
        #[serde(default)]
        metadata: ListMeta,
        #[serde(borrow, default)]
        items: Vec<&'a RawValue>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct ListMeta {
        #[serde(default)]
        resource_version: String,
        #[serde(default, rename = "continue")]
        continue_token: String,
    }
    let path = WasmFilter::url_path(&(), None);
    let mut objects = Vec::new();
    let mut token = String::new();
    loop {
        let mut params = ListParams::default().limit(PAGE_SIZE);
        if !token.is_empty() {
            params = params.continue_token(&token);
        }
        let request = Request::new(&path)
            .list(&params)
            .map_err(kube::Error::BuildRequest)?;
        let text = client.request_text(request).await?;
        let page: RawList = serde_json::from_str(&text).map_err(kube::Error::SerdeError)?;
        for item in page.items {
            if let Some(obj) = decode(item.get(), &hooks.notes, &*hooks.on_skip) {
                objects.push(obj);
            }
        }
        if page.metadata.continue_token.is_empty() {
            return Ok((objects, page.metadata.resource_version));
        }
        token = page.metadata.continue_token;
    }
}

async fn start_watch(client: &Client, resource_version: &str) -> Result<Lines, kube::Error> {
    // Bookmarks are on by default: they keep the resourceVersion fresh on a quiet watch.
    let params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
    let request = Request::new(WasmFilter::url_path(&(), None))
        .watch(&params, resource_version)
        .map_err(kube::Error::BuildRequest)?;
    let body = client.request_stream(request).await?;
    Ok(Box::pin(body.lines()))
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// One line of a watch: the event it carries, if it is one to pass on.
fn watch_event(st: &mut State, line: &str) -> Option<Event> {
    #[derive(Deserialize)]
    struct RawEvent<'a> {
        #[serde(rename = "type")]
        kind: String,
        #[serde(borrow)]
        object: &'a RawValue,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Bookmark {
        metadata: BookmarkMeta,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct BookmarkMeta {
        resource_version: String,
    }
    if line.trim().is_empty() {
        return None;
    }
    let event: RawEvent = match serde_json::from_str(line) {
        Ok(e) => e,
        Err(e) => {
            return Some(Err(watcher::Error::WatchFailed(kube::Error::SerdeError(e))));
        }
    };
    match event.kind.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            let obj = decode(event.object.get(), &st.hooks.notes, &*st.hooks.on_skip)?;
            if let Some(rv) = &obj.metadata.resource_version {
                st.resource_version.clone_from(rv);
            }
            Some(Ok(if event.kind == "DELETED" {
                watcher::Event::Delete(obj)
            } else {
                watcher::Event::Apply(obj)
            }))
        }
        "BOOKMARK" => {
            if let Ok(b) = serde_json::from_str::<Bookmark>(event.object.get()) {
                st.resource_version = b.metadata.resource_version;
            }
            None
        }
        "ERROR" => {
            let status: Status = match serde_json::from_str(event.object.get()) {
                Ok(s) => s,
                Err(e) => {
                    return Some(Err(watcher::Error::WatchFailed(kube::Error::SerdeError(e))));
                }
            };
            // 410 Gone: the resourceVersion is too old to resume from; list again.
            st.phase = if status.code == 410 {
                Phase::List
            } else {
                Phase::StartWatch
            };
            Some(Err(watcher::Error::WatchError(Box::new(status))))
        }
        _ => None,
    }
}

/// One object, decoded alone (see the module doc). `None` when it cannot be read at all.
fn decode(
    raw: &str,
    notes: &SpecNotes,
    on_skip: &(dyn Fn(&str) + Send + Sync),
) -> Option<WasmFilter> {
    let direct = if max_depth(raw) <= DIRECT_DECODE_DEPTH {
        serde_json::from_str::<WasmFilter>(raw).map_err(|e| e.to_string())
    } else {
        Err("nested too deep to decode whole".into())
    };
    let result = match direct {
        Ok(obj) => Ok((obj, None)),
        Err(direct_error) => take_apart(raw).map_err(|e| format!("{direct_error}; {e}")),
    };
    match result {
        Ok((obj, problem)) => {
            if let Some(uid) = &obj.metadata.uid {
                notes.set(uid, problem);
            }
            Some(obj)
        }
        Err(e) => {
            let what = describe(raw);
            tracing::error!(object = %what, error = %e, "a WasmFilter cannot be read; skipping it (the others are reconciled)");
            on_skip(&what);
            None
        }
    }
}

/// Decodes an object too deep to decode whole: drops `metadata.managedFields` and any
/// `spec.config` / `spec.vm.config` deeper than [`MAX_CONFIG_DEPTH`], and says which.
fn take_apart(raw: &str) -> Result<(WasmFilter, Option<String>), String> {
    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Parts<'a> {
        #[serde(borrow)]
        api_version: &'a RawValue,
        #[serde(borrow)]
        kind: &'a RawValue,
        #[serde(borrow)]
        metadata: BTreeMap<String, &'a RawValue>,
        #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
        spec: Option<BTreeMap<String, &'a RawValue>>,
        #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
        status: Option<&'a RawValue>,
    }
    let mut parts: Parts = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    parts.metadata.remove("managedFields");
    let mut problems = Vec::new();
    let vm_rebuilt;
    if let Some(spec) = parts.spec.as_mut() {
        if spec
            .get("config")
            .is_some_and(|c| max_depth(c.get()) > MAX_CONFIG_DEPTH)
        {
            problems.push(too_deep("spec.config", spec["config"].get()));
            spec.remove("config");
        }
        if let Some(vm) = spec.get("vm") {
            let mut vm: BTreeMap<String, &RawValue> =
                serde_json::from_str(vm.get()).map_err(|e| format!("spec.vm: {e}"))?;
            if vm
                .get("config")
                .is_some_and(|c| max_depth(c.get()) > MAX_CONFIG_DEPTH)
            {
                problems.push(too_deep("spec.vm.config", vm["config"].get()));
                vm.remove("config");
            }
            vm_rebuilt = serde_json::to_string(&vm).map_err(|e| e.to_string())?;
            let vm_raw: &RawValue = serde_json::from_str(&vm_rebuilt).map_err(|e| e.to_string())?;
            spec.insert("vm".into(), vm_raw);
        }
    }
    // The status is the operator's own and shallow; a deep one is not worth keeping.
    if parts.status.is_some_and(|s| max_depth(s.get()) > 16) {
        parts.status = None;
    }
    let rebuilt = serde_json::to_string(&parts).map_err(|e| e.to_string())?;
    if max_depth(&rebuilt) > DIRECT_DECODE_DEPTH {
        return Err("a field other than spec.config or spec.vm.config is nested too deep".into());
    }
    let obj: WasmFilter = serde_json::from_str(&rebuilt).map_err(|e| e.to_string())?;
    let problem = (!problems.is_empty()).then(|| problems.join("; "));
    Ok((obj, problem))
}

fn too_deep(field: &str, raw: &str) -> String {
    format!(
        "{field} is nested {} levels deep; at most {MAX_CONFIG_DEPTH} are accepted: flatten it, \
         or pass the configuration as a JSON string",
        max_depth(raw)
    )
}

/// `namespace/name (uid …)` of an object that could not be read, as far as it can be told.
fn describe(raw: &str) -> String {
    #[derive(Deserialize)]
    struct Meta {
        metadata: Option<Names>,
    }
    #[derive(Deserialize)]
    struct Names {
        namespace: Option<String>,
        name: Option<String>,
        uid: Option<String>,
    }
    match serde_json::from_str::<Meta>(raw) {
        Ok(Meta {
            metadata: Some(m), ..
        }) => format!(
            "{}/{} (uid {})",
            m.namespace.unwrap_or_default(),
            m.name.unwrap_or_default(),
            m.uid.unwrap_or_default()
        ),
        _ => "an object without readable metadata".into(),
    }
}

/// The deepest nesting of arrays and objects in a JSON text, counted without recursion
/// (strings are skipped, with their escapes). `{}` and `[]` are 1, a scalar 0.
pub fn max_depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
    }

    fn object(name: &str, config: &str, managed_depth: usize) -> String {
        format!(
            r#"{{"apiVersion":"wasmfilter.dev/v1alpha1","kind":"WasmFilter",
            "metadata":{{"name":"{name}","namespace":"ns","uid":"uid-{name}","resourceVersion":"7","generation":1,
              "managedFields":[{{"manager":"kubectl","operation":"Apply","fieldsType":"FieldsV1","fieldsV1":{managed}}}]}},
            "spec":{{"module":{{"image":"r.test:5000/f:v1"}},"config":{config},"vm":{{"id":"x","config":{config}}}}}}}"#,
            managed = nested(managed_depth)
        )
    }

    #[test]
    fn depth_counts_nesting_and_skips_strings() {
        assert_eq!(max_depth("1"), 0);
        assert_eq!(max_depth("{}"), 1);
        assert_eq!(max_depth(r#"{"a":[{"b":"{[{[\"]}"}]}"#), 3);
        assert_eq!(max_depth(&nested(1000)), 1000);
    }

    #[test]
    fn a_deep_config_empties_that_field_alone_and_says_why() {
        let notes = SpecNotes::default();
        let skip = |_: &str| panic!("nothing is skipped");
        for levels in [200, 1000, 100_000] {
            let raw = object("deep", &nested(levels), levels + 4);
            let obj = decode(&raw, &notes, &skip).expect("decoded");
            assert_eq!(obj.metadata.name.as_deref(), Some("deep"));
            assert_eq!(obj.spec.config, None);
            assert_eq!(obj.spec.vm.config, None);
            assert_eq!(obj.spec.vm.id, "x", "the rest of the spec is kept");
            assert!(obj.metadata.managed_fields.is_none());
            let problem = notes.problem("uid-deep").expect("a problem is noted");
            assert!(
                problem.contains(&format!("spec.config is nested {levels} levels deep"))
                    && problem.contains("spec.vm.config")
                    && problem.contains(&format!("at most {MAX_CONFIG_DEPTH}")),
                "{problem}"
            );
        }
        // Fixed: the note goes away with the next version.
        let raw = object("deep", r#"{"a":1}"#, 6);
        let obj = decode(&raw, &notes, &skip).expect("decoded");
        assert!(obj.spec.config.is_some());
        assert_eq!(notes.problem("uid-deep"), None);
    }

    #[test]
    fn a_config_within_the_bound_is_kept_even_when_managed_fields_are_deep() {
        let notes = SpecNotes::default();
        let raw = object("ok", &nested(MAX_CONFIG_DEPTH), 150);
        let obj = decode(&raw, &notes, &|_| panic!("not skipped")).expect("decoded");
        assert!(obj.spec.config.is_some());
        assert_eq!(notes.problem("uid-ok"), None);
    }

    #[test]
    fn an_unreadable_object_is_skipped_and_named() {
        let notes = SpecNotes::default();
        let skipped = Mutex::new(Vec::new());
        let raw = r#"{"apiVersion":"wasmfilter.dev/v1alpha1","kind":"WasmFilter",
            "metadata":{"name":"bad","namespace":"ns","uid":"u"},"spec":{"module":42}}"#;
        let on_skip = |what: &str| skipped.lock().unwrap().push(what.to_string());
        assert!(decode(raw, &notes, &on_skip).is_none());
        assert_eq!(*skipped.lock().unwrap(), vec!["ns/bad (uid u)".to_string()]);
    }

    #[test]
    fn a_list_with_a_deep_item_splits_into_objects() {
        let page = format!(
            r#"{{"kind":"WasmFilterList","metadata":{{"resourceVersion":"9"}},"items":[{},{}]}}"#,
            object("a", r#""plain""#, 5),
            object("deep", &nested(5000), 5004)
        );
        #[derive(Deserialize)]
        struct RawList<'a> {
            #[serde(borrow)]
            items: Vec<&'a RawValue>,
        }
        let list: RawList = serde_json::from_str(&page).expect("split without decoding");
        assert_eq!(list.items.len(), 2);
        let notes = SpecNotes::default();
        let names: Vec<_> = list
            .items
            .iter()
            .filter_map(|i| decode(i.get(), &notes, &|_| {}))
            .map(|o| o.metadata.name.unwrap())
            .collect();
        assert_eq!(names, ["a", "deep"]);
    }
}
