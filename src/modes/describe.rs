//! `keyfleet describe`: the registry's key pairs as a table a person reads, padded by display
//! width so Chinese names (two columns a character) line up.

use crate::dialect::record::KeyPairRecord;

/// Column widths of the table, in display columns; the last column (tags, resource group) is
/// not padded.
const WIDTHS: [usize; 6] = [8, 12, 16, 32, 20, 48];

/// The table: a header line and one line per record, each ending in `\n`.
pub fn table(records: &[KeyPairRecord]) -> String {
    let mut out = row(
        [
            "PROVIDER",
            "OWNER",
            "REGION",
            "NAME",
            "CREATED",
            "FINGERPRINT",
        ],
        "TAGS / RESOURCE GROUP",
    );
    for r in records {
        let tags: Vec<String> = r
            .tags
            .iter()
            .map(|t| format!("{}={}", t.key, t.value))
            .collect();
        let rest = format!(
            "{}{}",
            tags.join(","),
            r.resource_group_id
                .as_deref()
                .map(|g| format!(" rg={g}"))
                .unwrap_or_default()
        );
        let created = crate::time::rfc3339(r.created_at);
        out.push_str(&row(
            [
                r.scope.provider.as_str(),
                &r.scope.owner,
                &r.scope.region,
                &r.name,
                &created,
                &r.key_pair_fingerprint,
            ],
            &rest,
        ));
    }
    out
}

fn row(cells: [&str; 6], rest: &str) -> String {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(WIDTHS) {
        line.push_str(cell);
        let shown = unicode_width::UnicodeWidthStr::width(*cell);
        line.push_str(&" ".repeat(width.saturating_sub(shown) + 1));
    }
    line.push_str(rest);
    line.push('\n');
    line
}
