//! The admin listener: `/live` (the process answers), `/ready` (listening with a loaded
//! configuration), `/metrics` (Prometheus text), `/config_dump` (active filters as JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{Body, full};
use crate::state::State;

pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
        "/ready"
            if state.link.managed.load(Ordering::SeqCst)
                && !state.link.synced.load(Ordering::SeqCst) =>
        {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: waiting for the first snapshot from the operator\n".to_string(),
            )
        }
        "/ready" if state.ready.load(Ordering::SeqCst) => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            {
                let active = state.active.load();
                let filters: Vec<_> = active
                    .filters
                    .iter()
                    .map(|f| (f.name.as_str(), f.spec.metrics.as_ref()))
                    .collect();
                state.metrics.render(&filters)
            },
        ),
        "/config_dump" => (StatusCode::OK, "application/json", config_dump(&state)),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /live, /metrics or /config_dump\n".to_string(),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

fn config_dump(state: &State) -> String {
    let active = state.active.load();
    let filters: Vec<serde_json::Value> = active
        .filters
        .iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name,
                "digest": f.module().map(|m| m.digest.clone()),
                "abiVersion": f.module().map(|m| m.abi.as_str()),
                "native": match &f.kind {
                    crate::chain::FilterKind::Native { name, .. } => Some(name.as_str()),
                    crate::chain::FilterKind::Wasm(_) => None,
                },
                "version": f.version,
                "type": format!("{:?}", f.plugin_type),
                "listeners": f.listeners,
                "rootId": f.spec.root_id,
                "vmId": f.vm_id,
                "failurePolicy": format!("{:?}", f.failure_policy),
                "revision": f.revision(),
            })
        })
        .collect();
    let routes: Vec<serde_json::Value> = active
        .routes
        .iter()
        .map(|r| serde_json::json!({"name": r.config.name, "cluster": r.config.cluster}))
        .collect();
    let mut text = serde_json::to_string_pretty(&serde_json::json!({
        "configFile": state.config_file.display().to_string(),
        "generation": active.generation,
        "filters": filters,
        "routes": routes,
        "clusters": active.clusters.keys().collect::<Vec<_>>(),
        "operator": state.link.managed.load(Ordering::SeqCst).then(|| serde_json::json!({
            "connected": state.link.connected.load(Ordering::SeqCst),
            "synced": state.link.synced.load(Ordering::SeqCst),
            "appliedVersion": state.link.applied_version.load(Ordering::SeqCst),
        })),
    }))
    .unwrap_or_default();
    text.push('\n');
    text
}
