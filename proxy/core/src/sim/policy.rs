//! The scheduling policies a simulation can compare.

use crate::TenantId;
use crate::fair_queue::{FairQueue, ServiceWeights};
use std::collections::{HashMap, VecDeque};

/// Which policy a simulated server uses to pick the next request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// bulkhead's [`FairQueue`] (Virtual Token Counter, O(log n)), with
    /// prefill ordered by service counter and preemption for tenants far
    /// under their share of the batch.
    Vtc,
    /// The same queue without preemption: a newcomer waits for a sequence to finish.
    VtcNoPreempt,
    /// One first-come first-served queue for everybody.
    Fifo,
    /// The seed's weighted fair queue: finish tags from estimated cost,
    /// global virtual time the minimum over every tenant ever seen, and a sort
    /// of every queued request per batch ([`SortingWfq`]).
    SeedWfq,
}

impl Policy {
    /// Whether the server may preempt for a tenant far under its share.
    pub fn preempts(self) -> bool {
        self == Self::Vtc
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vtc => "bulkhead VTC",
            Self::VtcNoPreempt => "VTC, no preempt",
            Self::Fifo => "FIFO",
            Self::SeedWfq => "seed WFQ",
        }
    }
}

/// A request as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct Ticket {
    /// Unique id.
    pub id: u64,
    /// Owner.
    pub tenant: TenantId,
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Requested output limit (the seed's cost estimate uses it).
    pub max_tokens: u32,
    /// Tokens the request will actually generate: known to the simulated
    /// server (it stops there), never used by a scheduling policy.
    pub output_tokens: u32,
}

/// A queue under one of the [`Policy`]s, behind one interface.
#[derive(Debug)]
pub enum Scheduler {
    /// See [`Policy::Vtc`].
    Vtc(FairQueue<Ticket>),
    /// See [`Policy::Fifo`]: a global queue plus per-tenant counts for the backlog caps.
    Fifo {
        /// Arrival order.
        queue: VecDeque<Ticket>,
        /// Queued requests and cap per tenant.
        queued: HashMap<TenantId, (u32, u32)>,
    },
    /// See [`Policy::SeedWfq`].
    SeedWfq(SortingWfq),
}

impl Scheduler {
    /// An empty scheduler of `policy` for `tenants` given as (id, weight, backlog cap).
    pub fn new(policy: Policy, weights: ServiceWeights, tenants: &[(TenantId, u32, u32)]) -> Self {
        match policy {
            Policy::Vtc | Policy::VtcNoPreempt => {
                let mut q = FairQueue::new(weights);
                for (id, weight, cap) in tenants {
                    q.set_tenant(id, *weight, *cap);
                }
                Self::Vtc(q)
            }
            Policy::Fifo => Self::Fifo {
                queue: VecDeque::new(),
                queued: tenants
                    .iter()
                    .map(|(id, _, cap)| (id.clone(), (0, *cap)))
                    .collect(),
            },
            Policy::SeedWfq => {
                let mut q = SortingWfq::new(weights);
                for (id, weight, cap) in tenants {
                    q.set_tenant(id, *weight, *cap);
                }
                Self::SeedWfq(q)
            }
        }
    }

    /// Queues a ticket; false if the tenant's backlog is full.
    pub fn enqueue(&mut self, ticket: Ticket) -> bool {
        match self {
            Self::Vtc(q) => {
                let (tenant, prompt) = (ticket.tenant.clone(), ticket.prompt_tokens);
                q.enqueue(&tenant, prompt, ticket).is_ok()
            }
            Self::Fifo { queue, queued } => {
                let (n, cap) = queued.get_mut(&ticket.tenant).expect("registered tenant");
                if *n >= *cap {
                    return false;
                }
                *n += 1;
                queue.push_back(ticket);
                true
            }
            Self::SeedWfq(q) => q.enqueue(ticket),
        }
    }

    /// Takes the next ticket.
    pub fn dequeue(&mut self) -> Option<Ticket> {
        match self {
            Self::Vtc(q) => q.dequeue().map(|d| d.payload),
            Self::Fifo { queue, queued } => {
                let t = queue.pop_front()?;
                queued.get_mut(&t.tenant).expect("registered tenant").0 -= 1;
                Some(t)
            }
            Self::SeedWfq(q) => q.dequeue(),
        }
    }

    /// Takes the head request of `tenant`, out of the policy's order.
    pub fn dequeue_from(&mut self, tenant: &TenantId) -> Option<Ticket> {
        match self {
            Self::Vtc(q) => q.dequeue_from(tenant).map(|d| d.payload),
            Self::Fifo { queue, queued } => {
                let at = queue.iter().position(|t| &t.tenant == tenant)?;
                queued.get_mut(tenant).expect("registered tenant").0 -= 1;
                queue.remove(at)
            }
            Self::SeedWfq(q) => q.dequeue_from(tenant),
        }
    }

    /// The tenant the next [`Scheduler::dequeue`] would serve.
    pub fn peek_tenant(&mut self) -> Option<TenantId> {
        match self {
            Self::Vtc(q) => q.peek_tenant().cloned(),
            Self::Fifo { queue, .. } => queue.front().map(|t| t.tenant.clone()),
            Self::SeedWfq(q) => q.peek_tenant(),
        }
    }

    /// Puts a preempted ticket back at the head of its tenant's line.
    ///
    /// # Panics
    /// If the ticket's tenant is unknown (the simulation registers all tenants).
    pub fn requeue_front(&mut self, ticket: Ticket) {
        match self {
            Self::Vtc(q) => {
                let (tenant, prompt) = (ticket.tenant.clone(), ticket.prompt_tokens);
                q.requeue_front(&tenant, prompt, ticket)
                    .expect("a preempted request belongs to a registered tenant");
            }
            Self::Fifo { queue, queued } => {
                queued.get_mut(&ticket.tenant).expect("registered tenant").0 += 1;
                queue.push_front(ticket);
            }
            Self::SeedWfq(q) => q.requeue_front(ticket),
        }
    }

    /// Order of prefill work within a batch: lower goes first. The VTC uses
    /// its service counters; the other policies serve prefills in admission order.
    pub fn priority(&self, tenant: &TenantId) -> u128 {
        match self {
            Self::Vtc(q) => q.priority(tenant).unwrap_or(0),
            Self::Fifo { .. } | Self::SeedWfq(_) => 0,
        }
    }

    /// Reports generated tokens (only the VTC charges them as they are produced).
    pub fn charge_output(&mut self, tenant: &TenantId, tokens: u32) {
        if let Self::Vtc(q) = self {
            q.charge_output(tenant, tokens);
        }
    }

    /// Queued requests of `tenant`.
    pub fn queued(&self, tenant: &TenantId) -> usize {
        match self {
            Self::Vtc(q) => q.queued(tenant),
            Self::Fifo { queued, .. } => queued.get(tenant).map_or(0, |(n, _)| *n as usize),
            Self::SeedWfq(q) => q.queued(tenant),
        }
    }
}

#[derive(Debug)]
struct WfqTenant {
    weight: f64,
    cap: u32,
    queued: u32,
    last_finish: f64,
}

/// The seed's weighted fair queue, kept as the baseline bulkhead is measured against.
///
/// Each request gets a finish tag `max(V, last finish of its tenant) + estimated
/// cost / weight` when it arrives, where the estimate is `prompt × w_p +
/// max_tokens × w_q` and `V` is the minimum last finish tag over *every tenant
/// ever seen* (idle ones included). Each batch sorts every queued request by tag.
#[derive(Debug)]
pub struct SortingWfq {
    weights: ServiceWeights,
    tenants: HashMap<TenantId, WfqTenant>,
    /// Queued (finish tag, ticket), sorted descending when `sorted`.
    queue: Vec<(f64, Ticket)>,
    sorted: bool,
}

impl SortingWfq {
    /// An empty queue.
    pub fn new(weights: ServiceWeights) -> Self {
        Self {
            weights,
            tenants: HashMap::new(),
            queue: Vec::new(),
            sorted: true,
        }
    }

    /// Registers a tenant.
    pub fn set_tenant(&mut self, id: &TenantId, weight: u32, cap: u32) {
        self.tenants.insert(
            id.clone(),
            WfqTenant {
                weight: f64::from(weight),
                cap,
                queued: 0,
                last_finish: 0.0,
            },
        );
    }

    /// Tags and queues a ticket; false if its tenant's backlog is full or unknown.
    #[expect(
        clippy::cast_precision_loss,
        reason = "the seed computed tags in floating point"
    )]
    pub fn enqueue(&mut self, ticket: Ticket) -> bool {
        let global_v = self
            .tenants
            .values()
            .map(|t| t.last_finish)
            .fold(f64::INFINITY, f64::min);
        let Some(tenant) = self.tenants.get_mut(&ticket.tenant) else {
            return false;
        };
        if tenant.queued >= tenant.cap {
            return false;
        }
        let cost = self.weights.cost(
            u64::from(ticket.prompt_tokens),
            u64::from(ticket.max_tokens),
        ) as f64;
        let finish = global_v.max(tenant.last_finish) + cost / tenant.weight;
        tenant.last_finish = finish;
        tenant.queued += 1;
        self.queue.push((finish, ticket));
        self.sorted = false;
        true
    }

    /// Sorts every queued request by finish tag (the seed did this per batch).
    pub fn sort(&mut self) {
        self.queue
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.id.cmp(&a.1.id)));
        self.sorted = true;
    }

    /// Takes the request with the smallest finish tag, sorting first if needed.
    pub fn dequeue(&mut self) -> Option<Ticket> {
        if !self.sorted {
            self.sort();
        }
        let (_, ticket) = self.queue.pop()?;
        if let Some(t) = self.tenants.get_mut(&ticket.tenant) {
            t.queued -= 1;
        }
        Some(ticket)
    }

    /// Queued requests of `tenant`.
    pub fn queued(&self, tenant: &TenantId) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.queued as usize)
    }

    /// The tenant of the request with the smallest finish tag.
    pub fn peek_tenant(&mut self) -> Option<TenantId> {
        if !self.sorted {
            self.sort();
        }
        self.queue.last().map(|(_, t)| t.tenant.clone())
    }

    /// Takes the first request of `tenant` in tag order.
    pub fn dequeue_from(&mut self, tenant: &TenantId) -> Option<Ticket> {
        if !self.sorted {
            self.sort();
        }
        let at = self.queue.iter().rposition(|(_, t)| &t.tenant == tenant)?;
        let (_, ticket) = self.queue.remove(at);
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.queued -= 1;
        }
        Some(ticket)
    }

    /// Puts a preempted ticket back first in line (tag below every queued one).
    pub fn requeue_front(&mut self, ticket: Ticket) {
        if !self.sorted {
            self.sort();
        }
        let tag = self.queue.last().map_or(0.0, |(tag, _)| *tag);
        if let Some(t) = self.tenants.get_mut(&ticket.tenant) {
            t.queued += 1;
        }
        self.queue.push((tag, ticket));
    }
}
