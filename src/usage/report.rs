//! Reading the ledger: a [`Query`] (a time window, a key, a model, what to group by), the SQL
//! both stores run for it ([`sql`], one text with the dialect's day and placeholders), and the
//! [`Report`] it gives, as JSON or CSV. `GET /admin/usage` and `mofa-gateway usage` both read
//! through it.
//!
//! Pure: no I/O. Group columns come from a closed set ([`Group`]), never from the query string,
//! and every value is a bound parameter; a report has at most [`MAX_ROWS`] rows.

use serde_json::{json, Value};

/// Most rows a report gives (it says `truncated` past it).
pub(crate) const MAX_ROWS: usize = 100_000;

/// A column a report can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    Key,
    Model,
    Deployment,
    /// The UTC day of `ts`.
    Day,
}

impl Group {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Group::Key => "key",
            Group::Model => "model",
            Group::Deployment => "deployment",
            Group::Day => "day",
        }
    }

    /// `key,model,day`: the groups in the order given, each once.
    pub(crate) fn parse_list(s: &str) -> Result<Vec<Group>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let g = match part {
                "key" => Group::Key,
                "model" => Group::Model,
                "deployment" => Group::Deployment,
                "day" => Group::Day,
                other => {
                    return Err(format!(
                        "cannot group by `{}`: use key, model, deployment and day, \
                         comma-separated",
                        other.chars().take(64).collect::<String>()
                    ))
                }
            };
            if !out.contains(&g) {
                out.push(g);
            }
        }
        Ok(out)
    }
}

/// What a report reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Query {
    /// Records at or after it (Unix microseconds).
    pub from_us: Option<u64>,
    /// Records before it (Unix microseconds).
    pub to_us: Option<u64>,
    pub key: Option<String>,
    pub model: Option<String>,
    pub group_by: Vec<Group>,
}

/// How a report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Format {
    #[default]
    Json,
    Csv,
    /// A fixed-width table (the CLI's default).
    Table,
}

impl Query {
    /// A query from `name=value` parameters (`GET /admin/usage`'s, or the CLI's under the
    /// same names): `from`, `to` (see [`crate::utc::parse_time`]), `key`, `model`, `group_by`,
    /// `format` (`json`, `csv`, `table`). `Err` names the parameter at fault and why; an
    /// unknown or repeated one is refused.
    pub(crate) fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        now_us: u64,
    ) -> Result<(Query, Format), (&'static str, String)> {
        let mut q = Query::default();
        let mut format = None;
        let mut seen: Vec<&'static str> = Vec::new();
        for (name, value) in params {
            let name: &'static str = match name {
                "from" => "from",
                "to" => "to",
                "key" => "key",
                "model" => "model",
                "group_by" => "group_by",
                "format" => "format",
                other => {
                    return Err((
                        "query",
                        format!(
                            "unknown parameter `{}`: use from, to, key, model, group_by, format",
                            other.chars().take(64).collect::<String>()
                        ),
                    ))
                }
            };
            if seen.contains(&name) {
                return Err((name, format!("`{name}` is given twice")));
            }
            seen.push(name);
            match name {
                "from" => {
                    q.from_us = Some(
                        crate::utc::parse_time(value, now_us, false).map_err(|e| ("from", e))?,
                    )
                }
                "to" => {
                    q.to_us =
                        Some(crate::utc::parse_time(value, now_us, true).map_err(|e| ("to", e))?)
                }
                "key" => q.key = Some(value.to_owned()),
                "model" => q.model = Some(value.to_owned()),
                "group_by" => q.group_by = Group::parse_list(value).map_err(|e| ("group_by", e))?,
                _ => {
                    format = Some(match value {
                        "json" => Format::Json,
                        "csv" => Format::Csv,
                        "table" => Format::Table,
                        _ => return Err(("format", "`format` is json, csv or table".into())),
                    })
                }
            }
        }
        if let (Some(from), Some(to)) = (q.from_us, q.to_us) {
            if from >= to {
                return Err(("to", "`to` must be later than `from`".into()));
            }
        }
        Ok((q, format.unwrap_or_default()))
    }
}

/// A value a store binds, in the order of the SQL's placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bind {
    From,
    To,
    Key,
    Model,
}

/// The SQL of `q`, in a dialect: `day` is its expression of a record's UTC day, `param(n)` its
/// n-th placeholder (from 1). Returns the text and what to bind, in order. Its columns: the
/// groups, then requests, failed (reason not `ok`), tokens in, tokens out, cost.
pub(crate) fn sql(q: &Query, day: &str, param: impl Fn(usize) -> String) -> (String, Vec<Bind>) {
    let cols: Vec<&str> = q
        .group_by
        .iter()
        .map(|g| match g {
            Group::Key => "key",
            Group::Model => "model",
            Group::Deployment => "deployment",
            Group::Day => day,
        })
        .collect();
    let mut binds = Vec::new();
    let mut filter = Vec::new();
    for (bind, present, test) in [
        (Bind::From, q.from_us.is_some(), "ts >= "),
        (Bind::To, q.to_us.is_some(), "ts < "),
        (Bind::Key, q.key.is_some(), "key = "),
        (Bind::Model, q.model.is_some(), "model = "),
    ] {
        if present {
            binds.push(bind);
            filter.push(format!("{test}{}", param(binds.len())));
        }
    }
    let mut text = String::from("SELECT ");
    for c in &cols {
        text.push_str(c);
        text.push_str(", ");
    }
    text.push_str(
        "count(*), count(*) FILTER (WHERE reason <> 'ok'), \
         CAST(coalesce(sum(tokens_in), 0) AS BIGINT), \
         CAST(coalesce(sum(tokens_out), 0) AS BIGINT), \
         CAST(coalesce(sum(cost), 0) AS DOUBLE PRECISION) FROM usage_records",
    );
    if !filter.is_empty() {
        text.push_str(" WHERE ");
        text.push_str(&filter.join(" AND "));
    }
    if !cols.is_empty() {
        let list = (1..=cols.len())
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
    }
    text.push_str(&format!(" LIMIT {}", MAX_ROWS + 1));
    (text, binds)
}

/// One row of a report: its group values (as `group_by` names them) and sums.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Row {
    pub groups: Vec<Option<String>>,
    pub requests: u64,
    pub failed: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost: f64,
}

impl Row {
    fn add(&mut self, r: &Row) {
        self.requests += r.requests;
        self.failed += r.failed;
        self.tokens_in += r.tokens_in;
        self.tokens_out += r.tokens_out;
        self.cost += r.cost;
    }
}

/// A query's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub query: Query,
    pub rows: Vec<Row>,
    /// More rows matched than [`MAX_ROWS`]; `rows` holds the first of them.
    pub truncated: bool,
}

/// The sums' columns, after the groups.
const SUMS: [&str; 5] = ["requests", "failed", "tokens_in", "tokens_out", "cost"];

impl Report {
    /// Builds a report from the rows a store read (at most [`MAX_ROWS`] + 1 of them). A query
    /// with no group is one row, the totals; with no record there is then no row.
    pub(crate) fn new(query: Query, mut rows: Vec<Row>) -> Report {
        let truncated = rows.len() > MAX_ROWS;
        rows.truncate(MAX_ROWS);
        rows.retain(|r| r.requests > 0);
        Report {
            query,
            rows,
            truncated,
        }
    }

    /// The sums over every row (of the rows given, when truncated).
    pub(crate) fn total(&self) -> Row {
        let mut t = Row::default();
        self.rows.iter().for_each(|r| t.add(r));
        t
    }

    pub(crate) fn to_json(&self) -> Value {
        let time = |us: Option<u64>| us.map(|us| crate::budget::rfc3339(us / 1_000_000));
        let row = |r: &Row, groups: bool| {
            let mut m = serde_json::Map::new();
            if groups {
                for (g, v) in self.query.group_by.iter().zip(&r.groups) {
                    m.insert(g.as_str().into(), json!(v));
                }
            }
            m.insert("requests".into(), json!(r.requests));
            m.insert("failed".into(), json!(r.failed));
            m.insert("tokens_in".into(), json!(r.tokens_in));
            m.insert("tokens_out".into(), json!(r.tokens_out));
            m.insert("cost".into(), json!(r.cost));
            Value::Object(m)
        };
        json!({
            "object": "usage_report",
            "from": time(self.query.from_us),
            "to": time(self.query.to_us),
            "key": self.query.key,
            "model": self.query.model,
            "group_by": self.query.group_by.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
            "rows": self.rows.iter().map(|r| row(r, true)).collect::<Vec<_>>(),
            "total": row(&self.total(), false),
            "truncated": self.truncated,
        })
    }

    /// RFC 4180 CSV with a header row: the groups, then the sums. A cell that a spreadsheet
    /// would run as a formula (`=`, `+`, `-`, `@` first) is prefixed with `'`.
    pub(crate) fn to_csv(&self) -> String {
        let mut out = String::new();
        let header: Vec<&str> = self
            .query
            .group_by
            .iter()
            .map(|g| g.as_str())
            .chain(SUMS)
            .collect();
        out.push_str(&header.join(","));
        out.push_str("\r\n");
        for r in &self.rows {
            for g in &r.groups {
                out.push_str(&csv_cell(g.as_deref().unwrap_or_default()));
                out.push(',');
            }
            out.push_str(&format!(
                "{},{},{},{},{}\r\n",
                r.requests, r.failed, r.tokens_in, r.tokens_out, r.cost
            ));
        }
        out
    }

    /// The report written as `format` asks.
    pub(crate) fn render(&self, format: Format) -> String {
        match format {
            Format::Json => self.to_json().to_string(),
            Format::Csv => self.to_csv(),
            Format::Table => self.to_table(),
        }
    }

    /// A fixed-width table for a terminal (`mofa-gateway usage`), with a total line.
    pub(crate) fn to_table(&self) -> String {
        let mut lines: Vec<Vec<String>> = vec![self
            .query
            .group_by
            .iter()
            .map(|g| g.as_str().to_owned())
            .chain(SUMS.iter().map(|s| (*s).to_owned()))
            .collect()];
        let sums = |r: &Row| {
            [
                r.requests.to_string(),
                r.failed.to_string(),
                r.tokens_in.to_string(),
                r.tokens_out.to_string(),
                format!("{:.6}", r.cost),
            ]
        };
        for r in &self.rows {
            lines.push(
                r.groups
                    .iter()
                    .map(|g| printable(g.as_deref().unwrap_or("-")))
                    .chain(sums(r))
                    .collect(),
            );
        }
        let total = self.total();
        let mut last: Vec<String> = self.query.group_by.iter().map(|_| String::new()).collect();
        if let Some(first) = last.first_mut() {
            *first = "total".into();
        }
        lines.push(last.into_iter().chain(sums(&total)).collect());
        let width = |i: usize| {
            lines
                .iter()
                .map(|l| l.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..lines[0].len()).map(width).collect();
        let groups = self.query.group_by.len();
        let mut out = String::new();
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i < groups {
                        format!("{c:<w$}", w = widths[i])
                    } else {
                        format!("{c:>w$}", w = widths[i])
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        if self.truncated {
            out.push_str(&format!(
                "(the first {MAX_ROWS} rows; narrow the window or the groups)\n"
            ));
        }
        out
    }
}

/// `s` as one CSV cell.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `s` without control characters (a model name is what a client sent), for a terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(80)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(groups: &[Option<&str>], requests: u64, cost: f64) -> Row {
        Row {
            groups: groups.iter().map(|g| g.map(str::to_owned)).collect(),
            requests,
            failed: 1,
            tokens_in: 10 * requests,
            tokens_out: 20 * requests,
            cost,
        }
    }

    #[test]
    fn group_lists_are_a_closed_set() {
        assert_eq!(
            Group::parse_list("key, model,day,key"),
            Ok(vec![Group::Key, Group::Model, Group::Day])
        );
        assert_eq!(Group::parse_list(""), Ok(vec![]));
        let e = Group::parse_list("key,ts; DROP TABLE usage_records").unwrap_err();
        assert!(e.contains("`ts; DROP TABLE usage_records`"), "{e}");
    }

    #[test]
    fn the_sql_binds_every_value_and_groups_by_position() {
        let q = Query {
            from_us: Some(1),
            to_us: None,
            key: Some("k'; --".into()),
            model: Some("m".into()),
            group_by: vec![Group::Day, Group::Key],
        };
        let (text, binds) = sql(&q, "substr(ts, 1, 10)", |n| format!("?{n}"));
        assert_eq!(binds, vec![Bind::From, Bind::Key, Bind::Model]);
        assert!(
            text.starts_with("SELECT substr(ts, 1, 10), key, count(*)"),
            "{text}"
        );
        assert!(
            text.contains(" WHERE ts >= ?1 AND key = ?2 AND model = ?3 GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 100001"),
            "{text}"
        );
        assert!(!text.contains("k';"));
        let (text, binds) = sql(&Query::default(), "d", |n| format!("${n}"));
        assert!(binds.is_empty());
        assert!(text.ends_with("FROM usage_records LIMIT 100001"), "{text}");
    }

    #[test]
    fn json_csv_and_table_carry_the_same_rows_and_total() {
        let q = Query {
            from_us: Some(1_764_547_200_000_000),
            group_by: vec![Group::Key, Group::Model],
            ..Query::default()
        };
        let r = Report::new(
            q,
            vec![
                row(&[Some("team-a"), Some("m1")], 2, 0.5),
                row(&[None, Some("=cmd|' /C calc'!A0,\"x\"")], 1, 0.25),
            ],
        );
        let j = r.to_json();
        assert_eq!(j["from"], "2025-12-01T00:00:00Z");
        assert_eq!(j["to"], Value::Null);
        assert_eq!(j["group_by"], json!(["key", "model"]));
        assert_eq!(
            j["rows"][0],
            json!({"key": "team-a", "model": "m1", "requests": 2, "failed": 1,
                   "tokens_in": 20, "tokens_out": 40, "cost": 0.5})
        );
        assert_eq!(j["rows"][1]["key"], Value::Null);
        assert_eq!(
            j["total"],
            json!({"requests": 3, "failed": 2, "tokens_in": 30, "tokens_out": 60, "cost": 0.75})
        );
        assert_eq!(j["truncated"], false);
        assert_eq!(
            r.to_csv(),
            "key,model,requests,failed,tokens_in,tokens_out,cost\r\n\
             team-a,m1,2,1,20,40,0.5\r\n\
             ,\"'=cmd|' /C calc'!A0,\"\"x\"\"\",1,1,10,20,0.25\r\n"
        );
        let t = r.to_table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("key     model"), "{t}");
        assert!(
            lines[3].starts_with("total") && lines[3].ends_with("0.750000"),
            "{t}"
        );
    }

    #[test]
    fn parameters_are_read_or_refused_by_name() {
        let now = 1_765_000_000_000_000;
        let (q, f) = Query::from_params(
            [
                ("from", "2026-12-01"),
                ("to", "2026-12-05"),
                ("key", "team-a"),
                ("group_by", "model,day"),
                ("format", "csv"),
            ],
            now,
        )
        .unwrap();
        assert_eq!(f, Format::Csv);
        assert_eq!(q.key.as_deref(), Some("team-a"));
        assert_eq!(q.group_by, vec![Group::Model, Group::Day]);
        // `to` a day takes in that whole day.
        assert_eq!(
            q.to_us.unwrap() - q.from_us.unwrap(),
            5 * 86_400 * 1_000_000
        );
        let err = |p: &[(&str, &str)]| Query::from_params(p.iter().copied(), now).unwrap_err();
        assert_eq!(err(&[("form", "1d")]).0, "query");
        assert_eq!(err(&[("from", "yesterday")]).0, "from");
        assert_eq!(err(&[("key", "a"), ("key", "b")]).0, "key");
        assert_eq!(err(&[("group_by", "ts")]).0, "group_by");
        assert_eq!(err(&[("format", "xml")]).0, "format");
        assert_eq!(
            err(&[("from", "2026-12-02"), ("to", "2026-12-01T00:00:00Z")]).0,
            "to"
        );
        assert_eq!(
            Query::from_params([], now).unwrap(),
            (Query::default(), Format::Json)
        );
    }

    #[test]
    fn an_empty_total_is_no_row_and_a_long_answer_is_truncated() {
        let r = Report::new(Query::default(), vec![row(&[], 0, 0.0)]);
        assert!(r.rows.is_empty());
        assert_eq!(r.to_json()["total"]["requests"], 0);
        let many = (0..=MAX_ROWS as u64)
            .map(|i| row(&[Some("k")], i + 1, 0.0))
            .collect();
        let r = Report::new(
            Query {
                group_by: vec![Group::Key],
                ..Query::default()
            },
            many,
        );
        assert!(r.truncated);
        assert_eq!(r.rows.len(), MAX_ROWS);
    }
}
