//! The dispatcher's state, behind one mutex: queues, workers, live requests.

use super::{QueuePolicy, TenantSlot, WorkerSpec};
use bulkhead_core::{
    TenantId,
    fair_queue::{FairQueue, QueueHandle, ServiceWeights},
    wire::{
        Capacity, Finished, ProxyToWorker, Rejected, RequestId, Sampling, Submit, Violation,
        WorkerInfo, WorkerToProxy,
    },
};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};
use tokio::sync::mpsc;

/// A request ready to run: admitted, tokenized.
#[derive(Clone, Debug)]
pub struct Job {
    /// Its tenant.
    pub tenant: TenantId,
    /// The model, as the workers name it.
    pub model: String,
    /// The prompt's tokens.
    pub prompt_tokens: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Sampling.
    pub sampling: Sampling,
    /// The tenant's KV quota on a worker.
    pub kv_block_quota: u32,
}

/// What happens to a request, in order; `Finished` or `Failed` is the last.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The request left the fair queue for a worker (by its id).
    Dispatched {
        /// The worker's id.
        worker: u32,
    },
    /// Output tokens.
    Tokens {
        /// Index of the first in the output.
        first_index: u32,
        /// The tokens.
        tokens: Vec<u32>,
    },
    /// The KV guard refused an access of this request (it then fails).
    Violation(Violation),
    /// The worker refused the request (a `Finished` follows).
    Rejected(Rejected),
    /// The request ended on its worker.
    Finished(Finished),
    /// The worker holding it died; nothing more will come.
    Failed(String),
}

/// Why a request could not be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// The tenant has its maximum number of requests queued.
    #[error("tenant already has {cap} requests queued, its maximum")]
    QueueFull {
        /// The cap.
        cap: u32,
    },
    /// The tenant is not configured.
    #[error("tenant `{0}` is not configured")]
    UnknownTenant(TenantId),
    /// No live worker of the tenant's group serves the model.
    #[error("no worker serving model `{0}` is available")]
    NoWorker(String),
}

/// One request's events; dropping it cancels the request.
#[derive(Debug)]
pub struct Ticket {
    id: RequestId,
    events: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    done: bool,
}

impl Ticket {
    /// The request's id.
    pub const fn id(&self) -> RequestId {
        self.id
    }

    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let event = self.events.recv().await;
        if matches!(event, None | Some(Event::Finished(_) | Event::Failed(_))) {
            self.done = true;
        }
        event
    }

    /// Ends the request on its worker early (the proxy found a stop string
    /// in its text) while its events keep coming: the worker's `Finished`
    /// (reason `Cancelled`, with the tokens it used) still arrives.
    pub fn stop(&mut self) {
        if !self.done {
            self.shared.lock().stop(self.id);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.shared.lock().cancel(self.id);
        }
    }
}

/// A worker group's fair queue (the shared pool, or one tenant's own workers).
#[derive(Debug)]
pub(super) struct Group {
    pub queue: FairQueue<RequestId>,
    /// Under [`QueuePolicy::Fifo`]: queued requests in arrival order (the
    /// fair queue still holds them, for caps and cancellation). Ids that
    /// left the queue (cancelled) are skipped when they reach the front.
    arrivals: VecDeque<RequestId>,
}

impl Group {
    pub fn new(weights: ServiceWeights) -> Self {
        Self {
            queue: FairQueue::new(weights),
            arrivals: VecDeque::new(),
        }
    }
}

#[derive(Debug)]
struct Live {
    tenant: TenantId,
    group: Option<TenantId>,
    /// Until dispatched.
    submit: Option<Submit>,
    handle: Option<QueueHandle>,
    worker: Option<usize>,
    /// `None` once the client went away (the request is being cancelled).
    sink: Option<mpsc::UnboundedSender<Event>>,
}

#[derive(Debug)]
struct WorkerState {
    id: u32,
    group: Option<TenantId>,
    tx: Option<mpsc::UnboundedSender<ProxyToWorker>>,
    info: Option<WorkerInfo>,
    running: Running,
    /// The worker's last capacity report.
    capacity: Option<Capacity>,
}

/// The requests on a worker, with a count per tenant, so that whether a
/// full worker takes one more of a tenant costs O(1) on every pump.
#[derive(Debug, Default)]
struct Running {
    requests: BTreeMap<RequestId, TenantId>,
    per_tenant: HashMap<TenantId, usize>,
}

impl Running {
    fn len(&self) -> usize {
        self.requests.len()
    }

    fn insert(&mut self, id: RequestId, tenant: TenantId) {
        *self.per_tenant.entry(tenant.clone()).or_insert(0) += 1;
        if let Some(old) = self.requests.insert(id, tenant) {
            self.forget(&old);
        }
    }

    fn remove(&mut self, id: &RequestId) {
        if let Some(tenant) = self.requests.remove(id) {
            self.forget(&tenant);
        }
    }

    fn forget(&mut self, tenant: &TenantId) {
        if let Some(n) = self.per_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }

    /// Every request, leaving none.
    fn take(&mut self) -> Vec<RequestId> {
        self.per_tenant.clear();
        std::mem::take(&mut self.requests).into_keys().collect()
    }

    /// Requests of `tenant`, and tenants running with `tenant` counted in.
    fn share_of(&self, tenant: &TenantId) -> (usize, usize) {
        let mine = self.per_tenant.get(tenant).copied().unwrap_or(0);
        let tenants = self.per_tenant.len() + usize::from(mine == 0);
        (mine, tenants)
    }
}

/// Everything the dispatcher knows.
#[derive(Debug)]
pub(super) struct State {
    groups: HashMap<Option<TenantId>, Group>,
    tenant_group: HashMap<TenantId, Option<TenantId>>,
    workers: Vec<WorkerState>,
    requests: HashMap<RequestId, Live>,
    next_id: u128,
    policy: QueuePolicy,
}

/// The state and its lock.
#[derive(Debug)]
pub(super) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    pub fn new(state: State) -> Self {
        Self {
            state: Mutex::new(state),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state stays usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn submit(this: &Arc<Self>, job: Job) -> Result<Ticket, DispatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = this.lock().submit(job, tx)?;
        Ok(Ticket {
            id,
            events: rx,
            shared: this.clone(),
            done: false,
        })
    }
}

impl State {
    pub fn new(
        groups: HashMap<Option<TenantId>, Group>,
        tenants: &[TenantSlot],
        workers: &[WorkerSpec],
        policy: QueuePolicy,
    ) -> Self {
        Self {
            policy,
            groups,
            tenant_group: tenants
                .iter()
                .map(|t| (t.id.clone(), t.dedicated.then(|| t.id.clone())))
                .collect(),
            workers: workers
                .iter()
                .map(|w| WorkerState {
                    id: w.id,
                    group: w.dedicated.clone(),
                    tx: None,
                    info: None,
                    running: Running::default(),
                    capacity: None,
                })
                .collect(),
            requests: HashMap::new(),
            // Ids unique across proxy restarts too: start from the clock.
            next_id: u128::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ) << 64,
        }
    }

    fn submit(
        &mut self,
        job: Job,
        sink: mpsc::UnboundedSender<Event>,
    ) -> Result<RequestId, DispatchError> {
        let group = self
            .tenant_group
            .get(&job.tenant)
            .cloned()
            .ok_or_else(|| DispatchError::UnknownTenant(job.tenant.clone()))?;
        let served = self.workers.iter().any(|w| {
            w.group == group
                && w.info
                    .as_ref()
                    .is_some_and(|i| i.models.contains(&job.model))
        });
        if !served {
            return Err(DispatchError::NoWorker(job.model));
        }
        self.next_id += 1;
        let id = RequestId(self.next_id);
        let prompt_len = u32::try_from(job.prompt_tokens.len()).unwrap_or(u32::MAX);
        let g = self
            .groups
            .get_mut(&group)
            .expect("every tenant's group exists");
        let handle = g
            .queue
            .enqueue(&job.tenant, prompt_len, id)
            .map_err(|e| match e {
                bulkhead_core::fair_queue::EnqueueError::BacklogFull { cap, .. } => {
                    DispatchError::QueueFull { cap }
                }
                bulkhead_core::fair_queue::EnqueueError::UnknownTenant(_) => {
                    DispatchError::UnknownTenant(job.tenant.clone())
                }
            })?;
        if self.policy == QueuePolicy::Fifo {
            g.arrivals.push_back(id);
        }
        self.requests.insert(
            id,
            Live {
                tenant: job.tenant.clone(),
                group,
                submit: Some(Submit {
                    request_id: id,
                    tenant: job.tenant,
                    model: job.model,
                    prompt_tokens: job.prompt_tokens,
                    max_tokens: job.max_tokens,
                    sampling: job.sampling,
                    kv_block_quota: job.kv_block_quota,
                }),
                handle: Some(handle),
                worker: None,
                sink: Some(sink),
            },
        );
        self.pump();
        Ok(id)
    }

    /// The client went away: unqueue, or cancel on the worker.
    pub fn cancel(&mut self, id: RequestId) {
        let Some(live) = self.requests.get_mut(&id) else {
            return;
        };
        live.sink = None;
        if let Some(handle) = live.handle.take() {
            let group = live.group.clone();
            self.requests.remove(&id);
            if let Some(g) = self.groups.get_mut(&group) {
                g.queue.cancel(handle);
            }
            return;
        }
        if let Some(w) = live.worker
            && let Some(tx) = &self.workers[w].tx
        {
            // The record stays until the worker's Finished frees the slot.
            let _ = tx.send(ProxyToWorker::Cancel { request_id: id });
        }
    }

    /// Asks the worker running `id` to end it, keeping its events flowing.
    /// A request still queued has produced nothing to stop.
    pub fn stop(&mut self, id: RequestId) {
        let Some(live) = self.requests.get(&id) else {
            return;
        };
        if live.handle.is_some() {
            return;
        }
        if let Some(w) = live.worker
            && let Some(tx) = &self.workers[w].tx
        {
            let _ = tx.send(ProxyToWorker::Cancel { request_id: id });
        }
    }

    /// Whether `w` may take a request of `tenant` now: a free slot, or the
    /// tenant holds under its equal share of the worker's slots.
    fn can_take(&self, w: usize, tenant: &TenantId) -> bool {
        let worker = &self.workers[w];
        let (Some(_), Some(info)) = (&worker.tx, &worker.info) else {
            return false;
        };
        let running = worker.running.len();
        let slots = info.max_slots as usize;
        if running < slots {
            return true;
        }
        let (mine, tenants) = worker.running.share_of(tenant);
        // A full worker still takes a request of a tenant under its equal
        // share: the worker gives that tenant the next free slot (and
        // preempts at once below half the share). Over-commit is bounded by
        // the shares themselves.
        mine * tenants < slots
    }

    /// Hands queued requests to workers that can take them, in fair order
    /// (or in arrival order under [`QueuePolicy::Fifo`]).
    pub fn pump(&mut self) {
        let keys: Vec<Option<TenantId>> = self.groups.keys().cloned().collect();
        if self.policy == QueuePolicy::Fifo {
            for key in keys {
                self.pump_fifo(key.as_ref());
            }
            return;
        }
        for key in keys {
            while let Some((tenant, w)) = self.next_fair(&key) {
                let Some(next) = self
                    .groups
                    .get_mut(&key)
                    .and_then(|g| g.queue.dequeue_from(&tenant))
                else {
                    break;
                };
                self.requests
                    .get_mut(&next.payload)
                    .expect("queued requests are live")
                    .handle = None;
                self.send_to(next.payload, w, next.tenant);
            }
        }
    }

    /// The first tenant of group `key`, in fair order, whose head request a
    /// worker can take now, and the least busy such worker. A tenant no
    /// worker can take (at or over its share of full workers, or asking
    /// for a model none serves) is passed over, not waited on: it must not
    /// hold up a quiet tenant queued behind it.
    #[allow(clippy::ref_option)] // the groups' map key, as it is
    fn next_fair(&self, key: &Option<TenantId>) -> Option<(TenantId, usize)> {
        let group = self.groups.get(key)?;
        group.queue.tenants_in_order().find_map(|tenant| {
            let head = group.queue.head(tenant)?;
            let model = &self.requests.get(head)?.submit.as_ref()?.model;
            (0..self.workers.len())
                .filter(|&w| {
                    let worker = &self.workers[w];
                    worker.group == *key
                        && worker
                            .info
                            .as_ref()
                            .is_some_and(|i| i.models.contains(model))
                        && self.can_take(w, tenant)
                })
                .min_by_key(|&w| self.workers[w].running.len())
                .map(|w| (tenant.clone(), w))
        })
    }

    /// [`QueuePolicy::Fifo`]: the oldest queued request of group `key` goes
    /// to the least busy worker with a free slot; none free, it waits.
    fn pump_fifo(&mut self, key: Option<&TenantId>) {
        let key = &key.cloned();
        loop {
            let Some(&id) = self.groups[key].arrivals.front() else {
                return;
            };
            let Some(live) = self.requests.get(&id).filter(|l| l.handle.is_some()) else {
                // Cancelled while queued.
                self.groups
                    .get_mut(key)
                    .expect("group exists")
                    .arrivals
                    .pop_front();
                continue;
            };
            let model = live
                .submit
                .as_ref()
                .map(|s| s.model.clone())
                .expect("undispatched");
            let chosen = (0..self.workers.len())
                .filter(|&w| {
                    let worker = &self.workers[w];
                    worker.group == *key
                        && worker.tx.is_some()
                        && worker.info.as_ref().is_some_and(|i| {
                            i.models.contains(&model) && worker.running.len() < i.max_slots as usize
                        })
                })
                .min_by_key(|&w| self.workers[w].running.len());
            let Some(w) = chosen else {
                return;
            };
            let g = self.groups.get_mut(key).expect("group exists");
            g.arrivals.pop_front();
            let live = self.requests.get_mut(&id).expect("live");
            let handle = live.handle.take().expect("queued");
            g.queue.cancel(handle);
            let tenant = live.tenant.clone();
            self.send_to(id, w, tenant);
        }
    }

    /// Sends undispatched request `id` of `tenant` to worker `w`.
    fn send_to(&mut self, id: RequestId, w: usize, tenant: TenantId) {
        let live = self.requests.get_mut(&id).expect("live");
        let submit = live.submit.take().expect("undispatched");
        live.worker = Some(w);
        let worker = &mut self.workers[w];
        worker.running.insert(id, tenant);
        let sent = worker
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(ProxyToWorker::Submit(submit)).is_ok());
        if sent {
            let worker = self.workers[w].id;
            self.forward(id, Event::Dispatched { worker });
        } else {
            self.fail(id, "the worker went away before the request reached it");
        }
    }

    fn fail(&mut self, id: RequestId, why: &str) {
        if let Some(live) = self.requests.remove(&id) {
            if let Some(w) = live.worker {
                self.workers[w].running.remove(&id);
            }
            if let Some(sink) = live.sink {
                let _ = sink.send(Event::Failed(why.to_owned()));
            }
        }
    }

    /// A worker connected and said hello.
    pub fn worker_up(
        &mut self,
        index: usize,
        tx: mpsc::UnboundedSender<ProxyToWorker>,
        info: WorkerInfo,
    ) {
        let w = &mut self.workers[index];
        w.tx = Some(tx);
        w.info = Some(info);
        self.pump();
    }

    /// A worker's connection ended: its requests fail, the others go on.
    pub fn worker_down(&mut self, index: usize, why: &str) {
        let w = &mut self.workers[index];
        w.tx = None;
        w.capacity = None;
        let lost = w.running.take();
        let message = format!("worker {} failed: {why}; the request was lost", w.id);
        for id in lost {
            self.fail(id, &message);
        }
        self.pump();
    }

    /// A frame from worker `index`.
    pub fn on_frame(&mut self, index: usize, message: WorkerToProxy) {
        match message {
            WorkerToProxy::Tokens {
                request_id,
                first_index,
                tokens,
            } => {
                if let Some(live) = self.requests.get(&request_id) {
                    if let Some(g) = self.groups.get_mut(&live.group) {
                        g.queue.charge_output(
                            &live.tenant,
                            u32::try_from(tokens.len()).unwrap_or(u32::MAX),
                        );
                    }
                    if let Some(sink) = &live.sink {
                        let _ = sink.send(Event::Tokens {
                            first_index,
                            tokens,
                        });
                    }
                }
            }
            WorkerToProxy::Violation(v) => {
                tracing::error!(tenant = %v.tenant, kind = ?v.kind, block = v.block, "KV guard violation: {}", v.detail);
                self.forward(v.request_id, Event::Violation(v));
            }
            WorkerToProxy::Rejected(r) => {
                if let Some(id) = r.request_id {
                    self.forward(id, Event::Rejected(r));
                } else {
                    tracing::warn!(
                        "worker {} refused a frame: {:?}: {}",
                        self.workers[index].id,
                        r.kind,
                        r.detail
                    );
                }
            }
            WorkerToProxy::Finished(f) => {
                let id = f.request_id;
                self.workers[index].running.remove(&id);
                if let Some(live) = self.requests.remove(&id)
                    && let Some(sink) = live.sink
                {
                    let _ = sink.send(Event::Finished(f));
                }
                self.pump();
            }
            WorkerToProxy::Capacity(c) => self.workers[index].capacity = Some(c),
            WorkerToProxy::Hello(_) => {}
        }
    }

    fn forward(&self, id: RequestId, event: Event) {
        if let Some(sink) = self.requests.get(&id).and_then(|l| l.sink.as_ref()) {
            let _ = sink.send(event);
        }
    }

    pub fn workers_summary(&self) -> Vec<(u32, bool, u32)> {
        self.workers
            .iter()
            .map(|w| {
                (
                    w.id,
                    w.tx.is_some(),
                    u32::try_from(w.running.len()).unwrap_or(u32::MAX),
                )
            })
            .collect()
    }

    pub fn worker_views(&self) -> Vec<super::WorkerView> {
        self.workers
            .iter()
            .map(|w| super::WorkerView {
                id: w.id,
                alive: w.tx.is_some(),
                dedicated: w.group.clone(),
                running: u32::try_from(w.running.len()).unwrap_or(u32::MAX),
                capacity: w.capacity.clone(),
            })
            .collect()
    }

    pub fn queued_for(&self, tenant: &TenantId) -> usize {
        self.tenant_group
            .get(tenant)
            .and_then(|g| self.groups.get(g))
            .map_or(0, |g| g.queue.queued(tenant))
    }

    pub fn queued(&self) -> usize {
        self.groups.values().map(|g| g.queue.len()).sum()
    }

    /// Takes a reloaded config's tenants: new weights and queue caps, new
    /// tenants queue from now on, removed tenants queue nothing more (what
    /// they have queued is still served; nothing accepted is dropped).
    pub fn set_tenants(&mut self, tenants: &[TenantSlot], weights: ServiceWeights) {
        let keep: std::collections::HashSet<&TenantId> = tenants.iter().map(|t| &t.id).collect();
        let gone: Vec<(TenantId, Option<TenantId>)> = self
            .tenant_group
            .iter()
            .filter(|(t, _)| !keep.contains(t))
            .map(|(t, g)| (t.clone(), g.clone()))
            .collect();
        for (tenant, group) in gone {
            self.tenant_group.remove(&tenant);
            if let Some(g) = self.groups.get_mut(&group)
                && g.queue.queued(&tenant) == 0
            {
                g.queue.remove_tenant(&tenant);
            }
        }
        for t in tenants {
            let group = t.dedicated.then(|| t.id.clone());
            self.groups
                .entry(group.clone())
                .or_insert_with(|| Group::new(weights))
                .queue
                .set_tenant(&t.id, t.weight, t.max_queued);
            self.tenant_group.insert(t.id.clone(), group);
        }
    }

    pub fn all_alive(&self) -> bool {
        self.workers.iter().all(|w| w.tx.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_core::wire::{FinishReason, WorkerBackend};

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn job(who: &str, prompt: usize) -> Job {
        Job {
            tenant: tenant(who),
            model: "m".to_owned(),
            prompt_tokens: vec![65; prompt],
            max_tokens: 8,
            sampling: Sampling::default(),
            kv_block_quota: 100,
        }
    }

    /// A fair-queue state of `tenants` and one shared worker of `slots`, up.
    fn state(tenants: &[&str], slots: u32) -> (State, mpsc::UnboundedReceiver<ProxyToWorker>) {
        let slots_of: Vec<TenantSlot> = tenants
            .iter()
            .map(|t| TenantSlot {
                id: tenant(t),
                weight: 1,
                max_queued: 16,
                dedicated: false,
            })
            .collect();
        let worker = WorkerSpec {
            id: 0,
            socket: std::path::PathBuf::new(),
            spawn_args: None,
            dedicated: None,
            program: None,
        };
        let mut s = State::new(HashMap::new(), &slots_of, &[worker], QueuePolicy::Fair);
        s.set_tenants(&slots_of, ServiceWeights::default());
        let (tx, rx) = mpsc::unbounded_channel();
        s.worker_up(
            0,
            tx,
            WorkerInfo {
                backend: WorkerBackend::Sim,
                models: vec!["m".to_owned()],
                max_slots: slots,
                total_blocks: 100,
                block_tokens: 16,
            },
        );
        (s, rx)
    }

    fn submitted(rx: &mut mpsc::UnboundedReceiver<ProxyToWorker>) -> Vec<TenantId> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                ProxyToWorker::Submit(s) => Some(s.tenant),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_tenant_no_worker_can_take_does_not_hold_up_the_one_behind_it() {
        let (mut s, mut rx) = state(&["alpha", "bravo"], 2);
        let (sink, _events) = mpsc::unbounded_channel();
        // alpha and bravo share the two slots; bravo queues two more.
        let first = s.submit(job("alpha", 10), sink.clone()).unwrap();
        for _ in 0..3 {
            s.submit(job("bravo", 10), sink.clone()).unwrap();
        }
        assert_eq!(submitted(&mut rx).len(), 2);
        // alpha's request streams a long answer, charged as it comes, and
        // ends: its counter is now far above bravo's, and bravo takes the slot.
        s.on_frame(
            0,
            WorkerToProxy::Tokens {
                request_id: first,
                first_index: 0,
                tokens: vec![65; 2_000],
            },
        );
        s.on_frame(
            0,
            WorkerToProxy::Finished(Finished {
                request_id: first,
                reason: FinishReason::Length,
                prompt_tokens: 10,
                output_tokens: 2_000,
                prefix_cache_hit_tokens: 0,
                error: None,
            }),
        );
        assert_eq!(submitted(&mut rx), vec![tenant("bravo")]);
        // bravo now holds both slots, its third request queued: a full
        // worker and bravo alone on it, at its share, so no worker takes it.
        assert_eq!(s.queued_for(&tenant("bravo")), 1);
        // alpha comes back: behind bravo in fair order (its counter is
        // higher), yet under its share of the full worker, so it goes now.
        let queue = &s.groups[&None].queue;
        assert!(queue.priority(&tenant("alpha")) > queue.priority(&tenant("bravo")));
        s.submit(job("alpha", 10), sink).unwrap();
        assert_eq!(submitted(&mut rx), vec![tenant("alpha")]);
        assert_eq!(s.queued_for(&tenant("bravo")), 1, "bravo still waits");
        assert_eq!(
            s.groups[&None].queue.peek_tenant(),
            Some(&tenant("bravo")),
            "bravo kept its place at the head"
        );
    }
}
