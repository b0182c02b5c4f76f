//! The prime engine (placeholder, being written).
