//! RPC list results as text tables, for `evrhost rpc` on a terminal (as
//! kamcmd prints them readably): one row per item, the columns a method's
//! readers look at first; other lists show their scalar fields.

use serde_json::Value;

/// The columns shown for a method's list, and the header each gets.
fn columns(method: &str) -> Option<&'static [(&'static str, &'static str)]> {
    Some(match method {
        "plugin.list" => &[
            ("name", "PLUGIN"),
            ("tenant", "TENANT"),
            ("hash", "HASH"),
            ("exports", "EXPORTS"),
            ("isolation", "ISOLATION"),
            ("idle_instances", "IDLE"),
            ("reloads", "RELOADS"),
            ("source", "SOURCE"),
        ],
        "route.list" => &[("name", "ROUTE"), ("handlers", "HANDLERS (in order, :priority)")],
        "event.list" => &[
            ("target", "SUBSCRIBER"),
            ("events", "EVENTS"),
            ("filters", "FILTERS"),
            ("queued", "QUEUED"),
            ("delivered", "DELIVERED"),
            ("overflow", "OVERFLOW"),
            ("failed", "FAILED"),
        ],
        "api.list" => &[("name", "COMMAND"), ("usage", "USAGE"), ("description", "DESCRIPTION")],
        _ => return None,
    })
}

/// Cells wider than this are cut, so one long value cannot push every
/// other column off the screen; the last column (a path, a description)
/// has nothing after it and is shown whole.
const MAX_CELL: usize = 60;

/// `result` as a table, when it is a list of objects; None otherwise (the
/// caller prints JSON). An empty list is a line saying so.
pub fn render(method: &str, result: &Value) -> Option<String> {
    let rows = result.as_array()?;
    if rows.is_empty() {
        return Some("(none)\n".into());
    }
    if !rows.iter().all(Value::is_object) {
        return None;
    }
    let owned: Vec<(String, String)>;
    let cols: Vec<(&str, &str)> = match columns(method) {
        Some(cols) => cols.to_vec(),
        None => {
            let first = rows.first()?.as_object()?;
            owned = first
                .iter()
                .filter(|(_, v)| !v.is_object())
                .map(|(k, _)| (k.clone(), k.to_ascii_uppercase()))
                .collect();
            owned.iter().map(|(k, h)| (k.as_str(), h.as_str())).collect()
        }
    };
    let last = cols.len().saturating_sub(1);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| cols.iter().enumerate().map(|(i, (key, _))| cut(cell(&row[*key]), i == last)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, header))| cells.iter().map(|r| r[i].chars().count()).chain([header.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, items: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = items.zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, &mut cols.iter().map(|(_, h)| *h));
    for row in &cells {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    Some(out)
}

/// One value as a cell: text as itself, lists joined by commas (a pair
/// such as a route handler as `name:priority`), anything else as JSON;
/// control characters shown as `?`, so no value can drive the terminal.
fn cell(v: &Value) -> String {
    let text = match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([name, priority]) => format!("{}:{}", cell(name), cell(priority)),
                _ => cell(item),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn cut(cell: String, whole: bool) -> String {
    match cell.char_indices().nth(MAX_CELL).filter(|_| !whole) {
        Some((at, _)) => format!("{}…", &cell[..at]),
        None => cell,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn lists_of_objects_become_aligned_tables() {
        let routes = json!([
            {"name": "evrexec:test", "handlers": [["echo", 0]]},
            {"name": "r", "handlers": [["a", 10], ["erlang:x@y", 20]]},
        ]);
        let table = super::render("route.list", &routes).expect("a table");
        assert_eq!(
            table,
            "ROUTE         HANDLERS (in order, :priority)\nevrexec:test  echo:0\nr             a:10,erlang:x@y:20\n"
        );
        // Other lists: their scalar fields; not a list of objects: no table.
        let other = super::render("x.list", &json!([{"a": 1, "b": "t\u{1b}[2J", "c": {"d": 1}}])).expect("a table");
        assert_eq!(other, "A  B\n1  t?[2J\n");
        assert_eq!(super::render("x", &json!(["a", "b"])), None);
        assert_eq!(super::render("x", &json!({"a": 1})), None);
        assert_eq!(super::render("plugin.list", &json!([])).as_deref(), Some("(none)\n"));
        let long = super::render("x", &json!([{"a": "é".repeat(100), "b": "é".repeat(100)}])).expect("a table");
        let widths: Vec<usize> =
            long.lines().nth(1).unwrap_or_default().split("  ").map(|c| c.chars().count()).collect();
        assert_eq!(widths, [61, 100], "all but the last column are cut");
    }
}
