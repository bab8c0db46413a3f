//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go does it.
//!
//! - One Lease (`--lease-namespace`/`--lease-name`); its `holderIdentity` is the leader.
//! - Every write is a create or a replace carrying the `resourceVersion` that was read, so two
//!   replicas racing for the Lease cannot both win: the loser gets 409 Conflict and stays a
//!   follower.
//! - A follower takes the Lease over when its record (holder, renewTime) has not changed for
//!   `leaseDurationSeconds` *as measured on the follower's own clock* since it first saw that
//!   record, so clock skew between replicas does not matter.
//! - The leader renews every [`LeaseConfig::renew_every`] (5 s) and considers itself deposed
//!   when it could not renew for [`LeaseConfig::renew_deadline`] (10 s, less than the 15 s
//!   lease), so it stops before anyone else may take over.
//! - On a graceful stop the leader releases the Lease (empty holder), so a follower takes
//!   over at once instead of after 15 s.
//!
//! What the operator does with it (see `run`): a follower serves only `/live` and `/ready`
//! (503); it starts the controller and the gRPC listener once it leads, and the process exits
//! when the Lease is lost (the Deployment restarts it as a follower), so two replicas never
//! write status or serve dataplanes at once for longer than the renew deadline.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

/// Where the Lease is and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name): the Lease's `holderIdentity` while it leads.
    pub identity: String,
    /// `leaseDurationSeconds`: how long followers wait on an unchanged record.
    pub lease_duration: Duration,
    /// How often the leader renews (and a follower retries).
    pub renew_every: Duration,
    /// How long the leader may fail to renew before it steps down; less than `lease_duration`.
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// Why a leader stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LeaseLost {
    #[error("Lease {lease} is now held by {holder:?}")]
    TakenOver { lease: String, holder: String },
    #[error("could not renew Lease {lease} for {elapsed:?}: {last_error}")]
    RenewFailed {
        lease: String,
        elapsed: Duration,
        last_error: String,
    },
}

/// A Lease record as last seen, and when this replica first saw it.
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// Acquires, holds and releases the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Mutex<Option<Observed>>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One attempt to acquire or renew. `Ok(true)`: this replica holds the Lease now;
    /// `Ok(false)`: another replica does (or won a race for it).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let me = &self.config.identity;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_code(&e, 409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() != Some(me.as_str()) {
            if holder.is_some() && !self.expired(holder.clone(), spec) {
                return Ok(false);
            }
            spec.holder_identity = Some(me.clone());
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(self.lease_seconds());
        // `lease` carries the resourceVersion that was read: a concurrent write makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether another holder's record has stood unchanged for its lease duration, on this
    /// replica's clock.
    fn expired(&self, holder: Option<String>, spec: &LeaseSpec) -> bool {
        let mut observed = self.observed.lock().unwrap();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.config.lease_duration);
        match observed.as_ref() {
            Some(o) if o.holder == holder && o.renew_time == spec.renew_time => {
                o.at.elapsed() >= duration
            }
            _ => {
                *observed = Some(Observed {
                    holder,
                    renew_time: spec.renew_time.clone(),
                    at: Instant::now(),
                });
                false
            }
        }
    }

    /// Waits until this replica holds the Lease, retrying every `renew_every`.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.lease_name(), identity = %self.config.identity, "acquired the Lease; leading");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.lease_name(), "Lease acquisition failed; retrying")
                }
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the Lease every `renew_every` while it is held; returns when it is lost.
    pub async fn hold(&self) -> LeaseLost {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    let holder = self
                        .api
                        .get_opt(&self.config.name)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec)
                        .and_then(|s| s.holder_identity)
                        .unwrap_or_default();
                    return LeaseLost::TakenOver {
                        lease: self.lease_name(),
                        holder,
                    };
                }
                Err(e) => {
                    let elapsed = renewed.elapsed();
                    if elapsed >= self.config.renew_deadline {
                        return LeaseLost::RenewFailed {
                            lease: self.lease_name(),
                            elapsed,
                            last_error: e.to_string(),
                        };
                    }
                    tracing::warn!(error = %e, lease = %self.lease_name(), "Lease renewal failed; retrying");
                }
            }
        }
    }

    /// Gives the Lease up (if this replica holds it) so a follower takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.lease_name(), "released the Lease"),
            Err(e) => {
                tracing::warn!(error = %e, lease = %self.lease_name(), "releasing the Lease failed")
            }
        }
    }
}
