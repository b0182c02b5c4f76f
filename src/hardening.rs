//! Process-level protection of key material: a keyfleet process holds private keys (made,
//! in the reservoir, in flight), so it asks the kernel not to write core dumps of itself and
//! not to let other processes of the same user attach to it (`PR_SET_DUMPABLE` = 0 does both).

/// Makes this process non-dumpable. Best effort: where the call is refused, says so once.
pub fn no_core_dumps() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!("could not turn core dumps off (prctl PR_SET_DUMPABLE): {e}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_is_not_dumpable_afterwards() {
        super::no_core_dumps();
        let now = rustix::process::dumpable_behavior().unwrap();
        assert_eq!(now, rustix::process::DumpableBehavior::NotDumpable);
    }
}
