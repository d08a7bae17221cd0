//! Dispatch: the fair queue in front of the workers, and the workers' supervision.
//!
//! Requests that passed admission wait in a [`FairQueue`] per worker group:
//! the shared group (tenants of isolation `shared`), and one group per tenant
//! with workers of its own (`process`, `mig`, `dedicated`). Whenever a worker
//! can take a request, the group's queue picks whose turn it is (VTC): a
//! worker takes work while it has a free slot, or, when it is full, for a
//! tenant holding under its equal share of the slots (the worker then
//! preempts the tenant most over its share; see `bulkhead_kernels::engine`).
//! A tenant whose turn it is but whom no worker can take is passed over for
//! the next in fair order, keeping its place: a busy tenant waiting for a
//! slot never holds up a quiet one queued behind it.
//!
//! Each worker has a task ([`supervisor`]) that starts its process, connects,
//! forwards submits and cancels, routes tokens back, and when the worker
//! dies fails exactly the requests it held (with an error event) and starts
//! it again. A [`Ticket`] is one request's stream of events; dropping it
//! (the client went away) cancels the request, queued or running.

mod state;
mod supervisor;

pub use self::state::{DispatchError, Event, Job, Ticket};
use self::state::{Group, Shared, State};
use bulkhead_core::{TenantId, fair_queue::ServiceWeights};
use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

/// One worker process of the host.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// Its id (echoed in its Hello).
    pub id: u32,
    /// Its unix socket.
    pub socket: PathBuf,
    /// `bulkhead worker` arguments after `--listen` and `--worker-id`
    /// (backend, blocks, slots, model name, tenants); `None` to connect to a
    /// worker started by someone else.
    pub spawn_args: Option<Vec<String>>,
    /// The tenant whose workers these are; `None` for the shared pool.
    pub dedicated: Option<TenantId>,
    /// The `bulkhead` binary to start; `None` for this process's own.
    pub program: Option<PathBuf>,
}

/// A tenant as the dispatcher sees it.
#[derive(Clone, Debug)]
pub struct TenantSlot {
    /// The tenant.
    pub id: TenantId,
    /// Its share under contention.
    pub weight: u32,
    /// Most requests it may have queued.
    pub max_queued: u32,
    /// Whether it has workers of its own (else it uses the shared pool).
    pub dedicated: bool,
}

/// How a worker group's queue orders requests.
///
/// [`QueuePolicy::Fair`] is bulkhead's scheduler (VTC with bounded
/// over-commit, see the module docs). [`QueuePolicy::Fifo`] exists as the
/// baseline `bulkhead bench fairness` compares it with: requests go out in
/// arrival order across tenants, only into free slots, never over-committing
/// a full worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Virtual token counters: whose turn it is by service received.
    #[default]
    Fair,
    /// Plain first-in first-out into free slots.
    Fifo,
}

/// One worker as the dispatcher sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerView {
    /// Its id.
    pub id: u32,
    /// Whether its connection is up.
    pub alive: bool,
    /// The tenant it serves alone, if any.
    pub dedicated: Option<TenantId>,
    /// Requests dispatched to it and not finished.
    pub running: u32,
    /// Its last capacity report: free slots, free KV blocks, blocks per tenant.
    pub capacity: Option<bulkhead_core::wire::Capacity>,
}

/// The dispatcher: cheap to clone, shared by every request.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    weights: ServiceWeights,
}

impl Dispatcher {
    /// A dispatcher over `workers`, with supervisor tasks started on the
    /// current tokio runtime; queues are fair ([`QueuePolicy::Fair`]).
    pub fn start(
        weights: ServiceWeights,
        tenants: &[TenantSlot],
        workers: Vec<WorkerSpec>,
        restart_backoff: Duration,
    ) -> Self {
        Self::start_with_policy(
            weights,
            tenants,
            workers,
            restart_backoff,
            QueuePolicy::Fair,
        )
    }

    /// [`Dispatcher::start`] with a chosen queue policy (benchmarks compare
    /// [`QueuePolicy::Fifo`] against the fair queue).
    pub fn start_with_policy(
        weights: ServiceWeights,
        tenants: &[TenantSlot],
        workers: Vec<WorkerSpec>,
        restart_backoff: Duration,
        policy: QueuePolicy,
    ) -> Self {
        let mut groups: HashMap<Option<TenantId>, Group> = HashMap::new();
        groups.insert(None, Group::new(weights));
        for t in tenants {
            let key = t.dedicated.then(|| t.id.clone());
            groups
                .entry(key)
                .or_insert_with(|| Group::new(weights))
                .queue
                .set_tenant(&t.id, t.weight, t.max_queued);
        }
        let shared = Arc::new(Shared::new(State::new(groups, tenants, &workers, policy)));
        for (index, spec) in workers.into_iter().enumerate() {
            tokio::spawn(supervisor::run(
                shared.clone(),
                index,
                spec,
                restart_backoff,
            ));
        }
        Self { shared, weights }
    }

    /// Queues a request; its events arrive on the returned ticket.
    pub fn submit(&self, job: Job) -> Result<Ticket, DispatchError> {
        Shared::submit(&self.shared, job)
    }

    /// Per worker: (id, alive, requests running on it).
    pub fn workers(&self) -> Vec<(u32, bool, u32)> {
        self.shared.lock().workers_summary()
    }

    /// Every worker's state and its last capacity report (for the operator).
    pub fn worker_views(&self) -> Vec<WorkerView> {
        self.shared.lock().worker_views()
    }

    /// Requests of `tenant` waiting in its fair queue.
    pub fn queued_for(&self, tenant: &TenantId) -> usize {
        self.shared.lock().queued_for(tenant)
    }

    /// Requests waiting in the fair queues.
    pub fn queued(&self) -> usize {
        self.shared.lock().queued()
    }

    /// Takes a reloaded config's tenants (weights, queue caps, who may
    /// queue); see the state's `set_tenants`.
    pub fn set_tenants(&self, tenants: &[TenantSlot]) {
        let weights = self.weights;
        self.shared.lock().set_tenants(tenants, weights);
    }

    /// Waits until every worker has connected at least once, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.shared.lock().all_alive() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
