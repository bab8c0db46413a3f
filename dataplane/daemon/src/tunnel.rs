//! `CONNECT` tunnels, for routes that allow them (`routes[].connect`).
//!
//! A CONNECT request whose target host a connect route's `match.hosts` accepts is answered 200
//! once the route's cluster has accepted a TCP connection; the client's bytes then flow both
//! ways to it until either side closes. No HTTP filter sees into a tunnel (there are no HTTP
//! requests in it), so a connect route is the operator's explicit choice. Any other CONNECT is
//! refused with 405 ([`ProxyError::ConnectNotAllowed`]).

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{Body, full};
use crate::chain::Active;
use crate::error::ProxyError;

pub(crate) async fn connect(
    active: &Active,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let target = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or(ProxyError::InvalidTarget {
            reason: "CONNECT needs a host:port target".into(),
        })?;
    let host = wasmfilter_api::host_without_port(&target).to_ascii_lowercase();
    let route = active
        .routes
        .iter()
        .find(|r| r.config.connect && r.config.matches.matches(&host, "/", "CONNECT"))
        .ok_or(ProxyError::ConnectNotAllowed)?;
    let cluster = &route.config.cluster;
    let entry = active
        .clusters
        .get(cluster)
        .ok_or_else(|| ProxyError::UpstreamConnect {
            cluster: cluster.clone(),
            message: "the cluster is not configured".into(),
        })?;
    // The upstream first: a client told 200 must have somewhere to send its bytes.
    let mut upstream = crate::pool::connect_first(&entry.config.endpoints, entry.config.timeout)
        .await
        .map_err(|message| ProxyError::UpstreamConnect {
            cluster: cluster.clone(),
            message,
        })?;
    let route_name = route.config.name.clone();
    let upgrade = hyper::upgrade::on(req);
    tokio::task::spawn_local(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                tracing::debug!(route = %route_name, %target, ?copied, "CONNECT tunnel ended");
            }
            Err(e) => {
                tracing::debug!(route = %route_name, %e, "CONNECT: the client did not upgrade")
            }
        }
    });
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}
