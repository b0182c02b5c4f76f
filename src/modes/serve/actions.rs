//! The four key-pair actions of `keyfleet serve`, on the same registry and lifecycle as `run`
//! and the workers: a create is a job through [`Lifecycle::process`] (so it is reserved,
//! made, registered upstream and committed exactly as a batch row is, and delivered to its HTTP
//! answer);
//! import, describe and delete are registry operations — import and delete also reach the
//! upstream cloud when one is configured, describe answers from the registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::gateway::Caller;
use super::Answer;
use crate::dialect::action::{ActionKind, Targets};
use crate::dialect::record::KeyPairRecord;
use crate::dialect::{self, ApiError, Catalog, Provider};
use crate::job::{self, Job, Status, MESSAGE_VERSION};
use crate::keys::keygen::KeyBits;
use crate::lifecycle::{Finished, Lifecycle};
use crate::registry::{Claim, Filter, Registry, RegistryError};
use crate::sink::HttpReply;
use crate::upstream::{Configured, Registration, Upstream};

/// One of `dialect::action`'s decoders: provider, account, parameters, catalogue.
type ActionDecoder<T> =
    fn(Provider, &str, &BTreeMap<String, String>, &Catalog) -> Result<T, ApiError>;
/// The batch id every API create carries (results of `serve` go to HTTP answers, not batches).
pub const SERVE_BATCH: &str = "serve";

pub struct Actions<R> {
    /// Creates run through it with the configured upstream: with `--upstream-endpoint`,
    /// `serve` registers every key in that cloud too (a fast front for a slow cloud).
    pub lifecycle: Lifecycle<R, Configured>,
    pub upstream: Arc<Configured>,
    pub key_bits: KeyBits,
    pub tasks: tokio_util::task::TaskTracker,
}

impl<R> Clone for Actions<R> {
    fn clone(&self) -> Self {
        Actions {
            lifecycle: self.lifecycle.clone(),
            upstream: self.upstream.clone(),
            key_bits: self.key_bits,
            tasks: self.tasks.clone(),
        }
    }
}

impl<R: Registry> Actions<R> {
    pub async fn run(&self, caller: &Caller) -> Answer {
        let provider = caller.scheme.provider();
        let outcome = match caller.kind {
            ActionKind::Create => return self.create(caller).await,
            // Its own task, as a create: a client that goes away mid-import (a killed worker)
            // must not leave the name reserved, unlisted and untaken, until the reservation
            // expires — its retry would be told the name exists and find nothing there.
            ActionKind::Import => {
                let (actions, caller) = (self.clone(), caller.clone());
                let task = self
                    .tasks
                    .spawn(async move { actions.import(&caller).await });
                task.await.unwrap_or_else(|e| {
                    Err(ApiError::Internal(format!("the import task failed: {e}")))
                })
            }
            ActionKind::Describe => self.describe(caller).await,
            ActionKind::Delete => self.delete(caller).await,
        };
        match outcome {
            Ok(body) => Answer::ok(provider, &caller.action, body),
            Err(e) => Answer::error(provider, Some(&caller.action), &e),
        }
    }

    /// A create runs as its own task: if the client goes away mid-way, the pair is still made
    /// and settled (its key dropped) instead of leaving a half-done reservation behind.
    async fn create(&self, caller: &Caller) -> Answer {
        let provider = caller.scheme.provider();
        let job = Job {
            v: MESSAGE_VERSION,
            job_id: Uuid::new_v4(),
            batch_id: SERVE_BATCH.to_owned(),
            line: None,
            provider,
            owner: caller.key.account.clone(),
            params: caller.params.clone(),
            key_bits: self.key_bits,
        };
        let lifecycle = self.lifecycle.clone();
        let task = self.tasks.spawn(async move {
            let reply = HttpReply::new();
            let finished = lifecycle.process(job, 1, &reply).await;
            (finished, reply.take_key())
        });
        let (finished, key) = match task.await {
            Ok(done) => done,
            Err(e) => {
                let e = ApiError::Internal(format!("the create task failed: {e}"));
                return Answer::error(provider, Some(&caller.action), &e);
            }
        };
        match finished {
            Finished::Delivered(mut result) | Finished::Undeliverable { mut result, .. } => {
                match &result.status {
                    Status::Created(_) => {
                        let pem = key.map(|k| k.0);
                        let pem = pem.as_ref().map(|p| p.as_str()).unwrap_or("");
                        job::set_private_key_body(provider, &mut result.response, pem);
                        Answer::ok(
                            provider,
                            &caller.action,
                            std::mem::take(&mut result.response),
                        )
                    }
                    Status::Failed(f) => Answer {
                        provider,
                        action: caller.action.clone(),
                        status: f.http_status,
                        code: f.code.clone(),
                        body: std::mem::take(&mut result.response),
                    },
                }
            }
            // An HTTP reply is never gone: its request's future is dropped instead.
            Finished::AnsweredBefore | Finished::Abandoned => Answer::error(
                provider,
                Some(&caller.action),
                &ApiError::Internal("a fresh job was answered before".into()),
            ),
            Finished::HandBack(why) => {
                Answer::error(provider, Some(&caller.action), &ApiError::Internal(why))
            }
        }
    }

    async fn import(&self, caller: &Caller) -> Result<serde_json::Value, ApiError> {
        let req = self.decode(caller, dialect::decode_import)?;
        let (registry, settings) = (self.lifecycle.registry(), self.lifecycle.settings());
        let job_id = Uuid::new_v4();
        let claim = Claim {
            scope: &req.scope,
            name: &req.name,
            job_id,
            quota: settings.quota.for_region(&req.scope.region),
            ttl_ms: settings.reservation_ttl.as_millis() as i64,
        };
        registry.reserve(&claim).await.map_err(registry_error)?;
        let create = dialect::CreateRequest {
            scope: req.scope.clone(),
            name: req.name.clone(),
            resource_group_id: req.resource_group_id.clone(),
            tags: req.tags.clone(),
            zone: None,
        };
        let registration = Registration {
            req: &create,
            job_id,
            public_key: &req.key.line,
            fingerprint_md5: &req.key.fingerprint_md5,
            tried: &[],
        };
        let registered = match self.upstream.register(&registration).await {
            Ok(r) => r,
            Err(e) => {
                let _ = registry.release(&req.scope, &req.name, job_id).await;
                return Err(e);
            }
        };
        let (key_pair_id, key_pair_fingerprint) = dialect::key_pair_identity_with(
            &req.scope,
            &req.key.fingerprint_md5,
            &req.key.line,
            registered.key_pair_id,
        );
        let record = KeyPairRecord {
            scope: req.scope.clone(),
            name: req.name.clone(),
            job_id,
            key_pair_id,
            key_pair_fingerprint,
            fingerprint_md5: req.key.fingerprint_md5.clone(),
            fingerprint_sha256: req.key.fingerprint_sha256.clone(),
            public_key: req.key.line.clone(),
            created_at: crate::time::unix_now(),
            tags: req.tags.clone(),
            resource_group_id: req.resource_group_id.clone(),
            zone: caller.params.get("Zone").cloned(),
            delivered: false,
            earlier_keys: Vec::new(),
        };
        let settled = async {
            registry.commit(&record).await?;
            registry.mark_delivered(&req.scope, &req.name, job_id).await
        };
        if let Err(e) = settled.await {
            let _ = registry.release(&req.scope, &req.name, job_id).await;
            return Err(registry_error(e));
        }
        Ok(dialect::import_body(&record, Uuid::new_v4()))
    }

    async fn describe(&self, caller: &Caller) -> Result<serde_json::Value, ApiError> {
        let req = self.decode(caller, dialect::decode_describe)?;
        let all = self.in_scope(&req.scope).await?;
        let matching: Vec<KeyPairRecord> = all.into_iter().filter(|r| req.matches(r)).collect();
        let page: Vec<KeyPairRecord> = matching
            .iter()
            .skip(req.offset)
            .take(req.limit)
            .cloned()
            .collect();
        Ok(dialect::describe_body(
            &req,
            matching.len(),
            &page,
            Uuid::new_v4(),
        ))
    }

    async fn delete(&self, caller: &Caller) -> Result<serde_json::Value, ApiError> {
        let req = self.decode(caller, dialect::decode_delete)?;
        let registry = self.lifecycle.registry();
        let names: Vec<String> = match &req.targets {
            Targets::Names(names) => names.clone(),
            Targets::Ids(ids) => self
                .in_scope(&req.scope)
                .await?
                .into_iter()
                .filter(|r| r.key_pair_id.as_ref().is_some_and(|id| ids.contains(id)))
                .map(|r| r.name)
                .collect(),
        };
        for name in &names {
            if let Configured::Http(cloud) = &*self.upstream {
                cloud.delete_pair(&req.scope, name).await?;
            }
            registry
                .delete(&req.scope, name)
                .await
                .map_err(registry_error)?;
        }
        if !names.is_empty() {
            self.lifecycle.quota_changed(&req.scope);
        }
        Ok(dialect::delete_body(req.scope.provider, Uuid::new_v4()))
    }

    /// The caller's parameters through one of the dialects' action decoders.
    fn decode<T>(&self, caller: &Caller, decoder: ActionDecoder<T>) -> Result<T, ApiError> {
        let catalog = &self.lifecycle.settings().catalog;
        decoder(
            caller.scheme.provider(),
            &caller.key.account,
            &caller.params,
            catalog,
        )
    }

    async fn in_scope(&self, scope: &dialect::Scope) -> Result<Vec<KeyPairRecord>, ApiError> {
        let filter = Filter {
            provider: Some(scope.provider),
            owner: Some(scope.owner.clone()),
            region: Some(scope.region.clone()),
            ..Filter::default()
        };
        self.lifecycle
            .registry()
            .describe(&filter)
            .await
            .map_err(registry_error)
    }
}

fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::QuotaExceeded => ApiError::QuotaExceeded,
        RegistryError::AlreadyExists | RegistryError::AlreadyDelivered => ApiError::AlreadyExists,
        e => ApiError::Internal(e.to_string()),
    }
}
