//! `keyfleet status`: a batch's progress from its counters in Redis — total, created, failed
//! per error code, pending.

use crate::registry::batch_status::BatchStatus;

/// The report a person reads.
pub fn render(s: &BatchStatus) -> String {
    let total = s
        .total
        .map(|t| t.to_string())
        .unwrap_or_else(|| "? (still submitting)".into());
    let pending = s
        .pending()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "?".into());
    let mut out = format!(
        "batch {}: total {total}, created {}, failed {}, pending {pending}\n",
        s.batch_id,
        s.created,
        s.failed.values().sum::<u64>()
    );
    for (code, n) in &s.failed {
        out.push_str(&format!("  failed {code}: {n}\n"));
    }
    out
}
