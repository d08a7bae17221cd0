use super::*;

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn queue(tenants: &[(&str, u32)]) -> FairQueue<&'static str> {
    let mut q = FairQueue::new(ServiceWeights::default());
    for &(id, weight) in tenants {
        q.set_tenant(&t(id), weight, 10_000);
    }
    q
}

#[test]
fn serves_the_tenant_with_least_service_first() {
    let mut q = queue(&[("a", 1), ("b", 1)]);
    q.enqueue(&t("a"), 100, "a1").unwrap();
    q.enqueue(&t("a"), 100, "a2").unwrap();
    q.enqueue(&t("b"), 100, "b1").unwrap();
    // Equal counters: the older head request goes first; then a has been charged.
    assert_eq!(q.dequeue().unwrap().payload, "a1");
    assert_eq!(q.dequeue().unwrap().payload, "b1");
    assert_eq!(q.dequeue().unwrap().payload, "a2");
    assert!(q.dequeue().is_none());
}

#[test]
fn output_tokens_charged_later_shift_the_order() {
    let mut q = queue(&[("a", 1), ("b", 1)]);
    q.enqueue(&t("a"), 10, "a1").unwrap();
    q.enqueue(&t("b"), 10, "b1").unwrap();
    q.enqueue(&t("a"), 10, "a2").unwrap();
    q.enqueue(&t("b"), 10, "b2").unwrap();
    assert_eq!(q.dequeue().unwrap().payload, "a1");
    assert_eq!(q.dequeue().unwrap().payload, "b1");
    // b's first request generated 100 tokens; a's generated 1.
    assert!(q.charge_output(&t("b"), 100));
    assert!(q.charge_output(&t("a"), 1));
    assert_eq!(q.dequeue().unwrap().payload, "a2");
    assert_eq!(q.dequeue().unwrap().payload, "b2");
}

#[test]
fn weights_scale_the_service_exactly() {
    let mut q = queue(&[("heavy", 3), ("light", 1)]);
    for i in 0..4_000 {
        let tenant = if i % 2 == 0 { "heavy" } else { "light" };
        q.enqueue(&t(tenant), 7, "x").unwrap();
    }
    let mut served = HashMap::new();
    for _ in 0..2_000 {
        let d = q.dequeue().unwrap();
        *served.entry(d.tenant.to_string()).or_insert(0_u32) += 1;
    }
    assert_eq!(served["heavy"], 1_500);
    assert_eq!(served["light"], 500);
}

#[test]
fn remainders_carry_so_no_service_is_lost_to_rounding() {
    let mut q: FairQueue<()> = FairQueue::new(ServiceWeights {
        prompt: 1,
        output: 1,
    });
    q.set_tenant(&t("a"), 3, 10);
    for _ in 0..3 {
        q.charge_output(&t("a"), 1);
    }
    // Three charges of SCALE/3 each add up to exactly one token.
    assert!((q.counter(&t("a")).unwrap() - 1.0).abs() < f64::EPSILON);
}

#[test]
fn idle_time_is_not_banked() {
    let mut q = queue(&[("a", 1), ("b", 1)]);
    // b works alone for a long time.
    for _ in 0..100 {
        q.enqueue(&t("b"), 100, "b").unwrap();
    }
    for _ in 0..50 {
        q.dequeue().unwrap();
    }
    // a arrives: it is lifted to just below b's counter, so it goes next and
    // then alternates with b, instead of getting 50 requests in a row.
    for _ in 0..10 {
        q.enqueue(&t("a"), 100, "a").unwrap();
    }
    let order: Vec<_> = (0..6).map(|_| q.dequeue().unwrap().payload).collect();
    assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
}

#[test]
fn a_tenant_returning_to_an_idle_server_is_lifted_to_the_last_served() {
    let mut q = queue(&[("a", 1), ("b", 1)]);
    q.enqueue(&t("b"), 500, "b").unwrap();
    q.dequeue().unwrap();
    q.enqueue(&t("a"), 1, "a").unwrap();
    let lifted = q.counter(&t("a")).unwrap();
    assert!((lifted - 500.0).abs() < 1e-5, "{lifted}");
}

#[test]
fn backlog_cap_refuses_and_hands_the_payload_back() {
    let mut q: FairQueue<&str> = FairQueue::new(ServiceWeights::default());
    q.set_tenant(&t("a"), 1, 2);
    q.enqueue(&t("a"), 1, "one").unwrap();
    q.enqueue(&t("a"), 1, "two").unwrap();
    let err = q.enqueue(&t("a"), 1, "three").unwrap_err();
    assert_eq!(
        err.to_string(),
        "tenant already has 2 queued requests, its maximum"
    );
    assert_eq!(err.into_payload(), "three");
    assert_eq!(
        q.enqueue(&t("zed"), 1, "four"),
        Err(EnqueueError::UnknownTenant("four"))
    );
    // A preempted request goes back even when the backlog is full.
    q.requeue_front(&t("a"), 1, "preempted").unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q.dequeue().unwrap().payload, "preempted");
}

#[test]
fn cancel_removes_from_the_middle_and_frees_the_tenant() {
    let mut q = queue(&[("a", 1), ("b", 1)]);
    let a1 = q.enqueue(&t("a"), 1, "a1").unwrap();
    let a2 = q.enqueue(&t("a"), 1, "a2").unwrap();
    q.enqueue(&t("b"), 1, "b1").unwrap();
    assert!(q.contains(a2));
    assert_eq!(q.cancel(a2), Some("a2"));
    assert!(!q.contains(a2));
    assert_eq!(q.cancel(a2), None);
    assert_eq!(q.cancel(a1), Some("a1"));
    assert_eq!(q.backlogged_tenants(), 1);
    assert_eq!(q.queued(&t("a")), 0);
    assert_eq!(q.dequeue().unwrap().payload, "b1");
    assert!(q.is_empty());
    assert_eq!(q.backlogged_tenants(), 0);
}

#[test]
fn removing_a_tenant_returns_its_requests_and_keeps_the_others_intact() {
    let mut q = queue(&[("a", 1), ("b", 1), ("c", 1)]);
    let a1 = q.enqueue(&t("a"), 1, "a1").unwrap();
    q.enqueue(&t("c"), 1, "c1").unwrap();
    q.enqueue(&t("a"), 1, "a2").unwrap();
    let c2 = q.enqueue(&t("c"), 1, "c2").unwrap();
    assert_eq!(q.remove_tenant(&t("a")), vec!["a1", "a2"]);
    assert_eq!(q.len(), 2);
    // A stale handle finds nothing, even after the slot is reused.
    assert_eq!(q.cancel(a1), None);
    q.set_tenant(&t("d"), 1, 10);
    q.enqueue(&t("d"), 1, "d1").unwrap();
    assert_eq!(q.cancel(a1), None);
    assert_eq!(q.cancel(c2), Some("c2"));
    assert_eq!(q.dequeue().unwrap().payload, "c1");
    assert_eq!(q.dequeue().unwrap().payload, "d1");
    assert!(q.dequeue().is_none());
    assert_eq!(
        q.enqueue(&t("a"), 1, "again"),
        Err(EnqueueError::UnknownTenant("again"))
    );
}
