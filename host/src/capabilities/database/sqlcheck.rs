//! Layer 1 of the database grants: the host parses every statement before it
//! reaches the database (sqlparser, in the dialect of the backend) and checks
//! what it names against the manifest.
//!
//! * Exactly one statement per call, at most [`MAX_SQL_BYTES`] long.
//! * `query` takes a read: `SELECT`, `WITH … SELECT`, `VALUES`, `TABLE t`,
//!   set operations (`UNION` …). `execute` takes one `INSERT`, `UPDATE` or
//!   `DELETE` (optionally behind `WITH`, with `INSERT … SELECT`,
//!   `ON CONFLICT`, `RETURNING`).
//! * Every table named anywhere — `FROM`, joins, subqueries, CTE bodies, the
//!   source of an `INSERT … SELECT`, `x IN t` — must be granted:
//!   `database.read` or `database.write` (**write implies read** of the same
//!   table, as the PostgreSQL role is granted `SELECT` on it too: an
//!   `UPDATE … WHERE` has to read the rows it changes). The target of a
//!   write must be in `database.write`. The names a `WITH` defines are not
//!   tables; a CTE body sees only the CTEs before it (and itself when
//!   `RECURSIVE`), so `WITH users AS (SELECT * FROM users)` still checks the
//!   real `users`.
//! * Names compare case-insensitively. `public.t` (PostgreSQL) and `main.t`
//!   (SQLite) are `t`; any other schema must be granted as `schema.t`.
//!   Tables named `celer_*` (the host's own) and `sqlite_*` are never
//!   reachable, granted or not.
//! * Refused with `denied`: every other statement (DDL, `COPY`, `ATTACH`,
//!   `DETACH`, `PRAGMA`, `VACUUM`, `SET`/`RESET`, `GRANT`/`REVOKE`, `CALL`,
//!   `DO`, transaction control — use `begin`/`commit`/`rollback`), a
//!   data-modifying statement nested in another (`WITH d AS (DELETE …)`),
//!   `SELECT … INTO`, the functions of [`DENIED_FUNCTIONS`] /
//!   [`DENIED_FUNCTION_PREFIXES`], and table functions outside
//!   [`TABLE_FUNCTIONS`].
//! * Refused with `invalid`: SQL that does not parse, more than one
//!   statement, placeholders other than `$1 … $n`, or a parameter count
//!   that differs from the highest placeholder.
//!
//! The statement is then sent as written (for SQLite with `$n` rewritten to
//! `?n` on the token stream, never inside a literal or comment); whatever a
//! parser difference might let through is caught by layer 2, the database
//! itself (see `postgres.rs` and `sqlite.rs`).

use std::collections::{BTreeSet, HashSet};
use std::ops::ControlFlow;
use std::ptr;

use sqlparser::ast::{
    Expr, ObjectName, ObjectNamePart, Query, Select, SetExpr, Statement, TableFactor, TableObject,
    Visit, Visitor,
};
use sqlparser::dialect::{Dialect as SqlDialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::runtime::manifest::DatabaseGrants;

/// The longest statement a plugin may send.
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// How deep a statement may nest (subqueries, parentheses, expressions).
const RECURSION_LIMIT: usize = 64;

/// Functions a plugin may never call: they read or write server files, reach
/// other servers, read or change server settings, signal other sessions,
/// take server-wide locks, or run SQL text the parser never saw.
pub const DENIED_FUNCTIONS: &[&str] = &[
    // PostgreSQL: files and programs on the server
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    // PostgreSQL: settings and the server itself
    "current_setting",
    "set_config",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_promote",
    "pg_switch_wal",
    "pg_notify",
    "pg_import_system_collations",
    // PostgreSQL: sequences a plugin could reset
    "setval",
    // PostgreSQL: SQL text run inside the server, unseen by this parser
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    // SQLite: extensions and files
    "load_extension",
    "readfile",
    "writefile",
    "edit",
    "fts3_tokenizer",
    "zipfile",
    "sqlar_compress",
    "sqlar_uncompress",
];

/// Function name prefixes a plugin may never call (PostgreSQL large objects,
/// `dblink`, directory listings, replication, advisory locks, backups).
pub const DENIED_FUNCTION_PREFIXES: &[&str] = &[
    "lo_",
    "dblink",
    "pg_ls_",
    "pg_read_",
    "pg_file_",
    "pg_logical_",
    "pg_replication_",
    "pg_create_",
    "pg_drop_",
    "pg_copy_",
    "pg_advisory",
    "pg_try_advisory",
    "pg_backup",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_wal_replay",
];

/// Functions a plugin may use in `FROM` (set-returning functions that read
/// only their arguments).
pub const TABLE_FUNCTIONS: &[&str] = &[
    "generate_series",
    "unnest",
    "json_each",
    "json_tree",
    "json_each_text",
    "jsonb_each",
    "jsonb_each_text",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_to_record",
    "json_to_recordset",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "jsonb_path_query",
    "regexp_matches",
    "regexp_split_to_table",
    "string_to_table",
];

/// First words of statements that are refused before parsing, so that they
/// are `denied` even where this parser does not know their syntax.
const DENIED_KEYWORDS: &[&str] = &[
    "ALTER", "ANALYZE", "ATTACH", "BEGIN", "CALL", "CHECKPOINT", "CLUSTER", "COMMENT", "COMMIT",
    "COPY", "CREATE", "DEALLOCATE", "DETACH", "DISCARD", "DO", "DROP", "END", "EXECUTE", "EXPLAIN",
    "GRANT", "IMPORT", "LISTEN", "LOAD", "LOCK", "NOTIFY", "PRAGMA", "PREPARE", "REASSIGN",
    "REFRESH", "REINDEX", "RELEASE", "RESET", "REVOKE", "ROLLBACK", "SAVEPOINT", "SECURITY", "SET",
    "SHOW", "START", "TRUNCATE", "UNLISTEN", "VACUUM",
];

/// The SQL dialect, which is also the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    fn parser_dialect(self) -> Box<dyn SqlDialect> {
        match self {
            Dialect::Postgres => Box::new(PostgreSqlDialect {}),
            Dialect::Sqlite => Box::new(SQLiteDialect {}),
        }
    }

    /// The schema unqualified names resolve to.
    pub fn default_schema(self) -> &'static str {
        match self {
            Dialect::Postgres => "public",
            Dialect::Sqlite => "main",
        }
    }
}

/// Which call the statement came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `query`: reads only.
    Read,
    /// `execute`: one INSERT, UPDATE or DELETE.
    Write,
}

/// Why a statement was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Outside the grants or never allowed: `host-error.denied`.
    Denied(String),
    /// Not a statement this interface can run: `host-error.invalid`.
    Invalid(String),
}

/// The tables of a manifest, normalised: lower case, the default schema
/// dropped (`public.t` / `main.t` → `t`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub read: BTreeSet<String>,
    pub write: BTreeSet<String>,
}

impl Policy {
    pub fn from_grants(grants: &DatabaseGrants, dialect: Dialect) -> Policy {
        let norm = |t: &String| {
            let t = t.to_ascii_lowercase();
            match t.split_once('.') {
                Some((schema, table)) if schema == dialect.default_schema() => table.to_string(),
                _ => t,
            }
        };
        Policy { read: grants.read.iter().map(norm).collect(), write: grants.write.iter().map(norm).collect() }
    }

    /// Reading is granted by `database.read` or `database.write`.
    pub fn can_read(&self, table: &str) -> bool {
        !is_reserved(table) && (self.read.contains(table) || self.write.contains(table))
    }

    pub fn can_write(&self, table: &str) -> bool {
        !is_reserved(table) && self.write.contains(table)
    }

    /// Every table this policy names (for the database layer's grants).
    pub fn tables(&self) -> impl Iterator<Item = &String> {
        self.read.iter().chain(self.write.iter())
    }
}

/// The host's own tables (`celer_*`) and SQLite's internals (`sqlite_*`).
pub fn is_reserved(table: &str) -> bool {
    let name = table.rsplit('.').next().unwrap_or(table);
    name.starts_with("celer_") || name.starts_with("sqlite_")
}

/// A statement that passed: the text to send, and the tables it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The statement as the backend takes it (placeholders rewritten for SQLite).
    pub sql: String,
    /// Tables the statement reads (not counting the write target).
    pub reads: Vec<String>,
    /// The table an `execute` writes.
    pub writes: Vec<String>,
}

/// Checks one statement against `policy`. `params` is the number of bound
/// parameters the call carries.
pub fn check(dialect: Dialect, kind: Kind, sql: &str, params: usize, policy: &Policy) -> Result<Checked, Refusal> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(Refusal::Invalid(format!("the statement is longer than {MAX_SQL_BYTES} bytes")));
    }
    let parser_dialect = dialect.parser_dialect();
    let tokens = Tokenizer::new(&*parser_dialect, sql)
        .tokenize_with_location()
        .map_err(|e| Refusal::Invalid(format!("SQL does not parse: {e}")))?;
    if let Some(word) = tokens.iter().find_map(|t| match &t.token {
        Token::Whitespace(_) => None,
        Token::Word(w) => Some(w.value.to_ascii_uppercase()),
        _ => Some(String::new()),
    }) && DENIED_KEYWORDS.contains(&word.as_str())
    {
        return Err(Refusal::Denied(format!("{word} statements are not allowed (only SELECT, INSERT, UPDATE, DELETE; transactions through begin/commit/rollback)")));
    }

    let statements = Parser::new(&*parser_dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| Refusal::Invalid(format!("SQL does not parse: {e}")))?;
    let statement = match statements.as_slice() {
        [one] => one,
        [] => return Err(Refusal::Invalid("no SQL statement given".into())),
        _ => return Err(Refusal::Invalid(format!("one statement per call, got {}", statements.len()))),
    };

    let targets = classify(dialect, kind, statement)?;
    for target in &targets {
        if !policy.can_write(target) {
            return Err(denied_table(target, "database.write"));
        }
    }

    let mut walker = Walker { dialect, policy, scopes: Vec::new(), table_functions: HashSet::new(), named: BTreeSet::new(), dml: 0 };
    if let ControlFlow::Break(refusal) = statement.visit(&mut walker) {
        return Err(refusal);
    }
    let allowed_dml = match kind {
        Kind::Read => 0,
        Kind::Write => 1,
    };
    if walker.dml > allowed_dml {
        return Err(Refusal::Denied("a data-modifying statement inside another statement is not allowed".into()));
    }

    let sql = placeholders(dialect, sql, &tokens, params)?;
    let writes: Vec<String> = targets.into_iter().collect();
    let reads = walker.named.into_iter().filter(|t| !writes.contains(t)).collect();
    Ok(Checked { sql, reads, writes })
}

fn denied_table(table: &str, grant: &str) -> Refusal {
    if is_reserved(table) {
        Refusal::Denied(format!("table {table} belongs to the host and is never reachable"))
    } else {
        Refusal::Denied(format!("table {table} is not in {grant}"))
    }
}

/// What kind of statement this is; for a write, its target table(s).
fn classify(dialect: Dialect, kind: Kind, statement: &Statement) -> Result<BTreeSet<String>, Refusal> {
    let mut targets = BTreeSet::new();
    let write = match statement {
        Statement::Query(q) => match &*q.body {
            SetExpr::Insert(inner) | SetExpr::Update(inner) | SetExpr::Delete(inner) => Some(inner),
            SetExpr::Merge(_) => return Err(Refusal::Denied("MERGE is not allowed".into())),
            _ => None,
        },
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => Some(statement),
        other => {
            let word = other.to_string().split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            return Err(Refusal::Denied(format!(
                "{word} statements are not allowed (only SELECT, INSERT, UPDATE, DELETE)"
            )));
        }
    };
    match (kind, write) {
        (Kind::Read, None) => Ok(targets),
        (Kind::Read, Some(_)) => Err(Refusal::Denied("query runs reads only; use execute for INSERT, UPDATE, DELETE".into())),
        (Kind::Write, None) => Err(Refusal::Denied("execute runs INSERT, UPDATE or DELETE; use query for reads".into())),
        (Kind::Write, Some(w)) => {
            let name = match w {
                Statement::Insert(insert) => match &insert.table {
                    TableObject::TableName(name) => name.clone(),
                    _ => return Err(Refusal::Denied("INSERT into a table function is not allowed".into())),
                },
                Statement::Update(update) => {
                    if !update.table.joins.is_empty() {
                        return Err(Refusal::Invalid("UPDATE of a join is not supported; use UPDATE … FROM".into()));
                    }
                    match &update.table.relation {
                        TableFactor::Table { name, args: None, .. } => name.clone(),
                        _ => return Err(Refusal::Invalid("UPDATE needs a table name".into())),
                    }
                }
                Statement::Delete(delete) => {
                    let from = match &delete.from {
                        sqlparser::ast::FromTable::WithFromKeyword(f) | sqlparser::ast::FromTable::WithoutKeyword(f) => f,
                    };
                    if !delete.tables.is_empty() || from.len() != 1 || !from[0].joins.is_empty() {
                        return Err(Refusal::Invalid("DELETE takes one table (DELETE FROM t [USING …] WHERE …)".into()));
                    }
                    match &from[0].relation {
                        TableFactor::Table { name, args: None, .. } => name.clone(),
                        _ => return Err(Refusal::Invalid("DELETE needs a table name".into())),
                    }
                }
                _ => return Err(Refusal::Denied("only INSERT, UPDATE and DELETE write".into())),
            };
            targets.insert(table_name(dialect, &name)?);
            Ok(targets)
        }
    }
}

/// The canonical name of a relation: lower case, default schema dropped.
fn table_name(dialect: Dialect, name: &ObjectName) -> Result<String, Refusal> {
    let mut parts = Vec::with_capacity(name.0.len());
    for part in &name.0 {
        match part {
            ObjectNamePart::Identifier(ident) => parts.push(ident.value.to_ascii_lowercase()),
            _ => return Err(Refusal::Invalid(format!("unsupported table name {name}"))),
        }
    }
    match parts.as_slice() {
        [t] => Ok(t.clone()),
        [s, t] if s == dialect.default_schema() => Ok(t.clone()),
        [s, t] => Ok(format!("{s}.{t}")),
        _ => Err(Refusal::Denied(format!("table {name}: names with a database or catalog part are not allowed"))),
    }
}

/// The last part of a function name, lower case (`pg_catalog.pg_read_file` → `pg_read_file`).
fn function_name(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => ident.value.to_ascii_lowercase(),
        _ => name.to_string().to_ascii_lowercase(),
    }
}

pub fn function_denied(name: &str) -> bool {
    DENIED_FUNCTIONS.contains(&name) || DENIED_FUNCTION_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// One query's view of the names its `WITH` clauses define.
struct Scope {
    /// Names visible in the query's body (and everything nested in it).
    body: HashSet<String>,
    /// For each CTE body of this query: its address and the names it sees.
    ctes: Vec<(*const Query, HashSet<String>)>,
}

struct Walker<'a> {
    dialect: Dialect,
    policy: &'a Policy,
    scopes: Vec<Scope>,
    /// Relation names that are table functions (`FROM generate_series(…)`).
    table_functions: HashSet<*const ObjectName>,
    /// Every table the statement names.
    named: BTreeSet<String>,
    /// INSERT / UPDATE / DELETE / MERGE statements seen, nested ones included.
    dml: usize,
}

impl Walker<'_> {
    fn visible(&self) -> Option<&HashSet<String>> {
        self.scopes.last().map(|s| &s.body)
    }

    fn read(&mut self, name: &ObjectName) -> ControlFlow<Refusal> {
        if let [ObjectNamePart::Identifier(ident)] = name.0.as_slice()
            && self.visible().is_some_and(|v| v.contains(&ident.value.to_ascii_lowercase()))
        {
            return ControlFlow::Continue(()); // a CTE, not a table
        }
        let table = match table_name(self.dialect, name) {
            Ok(t) => t,
            Err(r) => return ControlFlow::Break(r),
        };
        if !self.policy.can_read(&table) {
            return ControlFlow::Break(denied_table(&table, "database.read"));
        }
        self.named.insert(table);
        ControlFlow::Continue(())
    }

    /// `TABLE t` (PostgreSQL's short `SELECT * FROM t`), anywhere in a set expression.
    fn table_statements(&mut self, body: &SetExpr) -> ControlFlow<Refusal> {
        match body {
            SetExpr::Table(t) => {
                let Some(table) = &t.table_name else { return ControlFlow::Continue(()) };
                let mut parts = Vec::new();
                if let Some(schema) = &t.schema_name {
                    parts.push(ObjectNamePart::Identifier(schema.clone()));
                }
                parts.push(ObjectNamePart::Identifier(table.clone()));
                self.read(&ObjectName(parts))
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.table_statements(left)?;
                self.table_statements(right)
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

impl Visitor for Walker<'_> {
    type Break = Refusal;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Refusal> {
        let inherited = match self.scopes.last() {
            None => HashSet::new(),
            Some(parent) => match parent.ctes.iter().find(|(p, _)| ptr::eq(*p, query)) {
                Some((_, names)) => names.clone(),
                None => parent.body.clone(),
            },
        };
        let mut body = inherited.clone();
        let mut ctes = Vec::new();
        if let Some(with) = &query.with {
            let mut before = inherited;
            for cte in &with.cte_tables {
                let name = cte.alias.name.value.to_ascii_lowercase();
                let mut sees = before.clone();
                if with.recursive {
                    sees.insert(name.clone());
                }
                ctes.push((&*cte.query as *const Query, sees));
                before.insert(name.clone());
                body.insert(name);
            }
        }
        self.scopes.push(Scope { body, ctes });
        self.table_statements(&query.body)
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<Refusal> {
        self.scopes.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<Refusal> {
        if select.into.is_some() {
            return ControlFlow::Break(Refusal::Denied("SELECT … INTO is not allowed".into()));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Refusal> {
        let function = match factor {
            TableFactor::Table { name, args: Some(_), .. } => {
                self.table_functions.insert(name as *const ObjectName);
                Some(name)
            }
            TableFactor::Function { name, .. } => Some(name),
            _ => None,
        };
        if let Some(name) = function {
            let f = function_name(name);
            if function_denied(&f) || !TABLE_FUNCTIONS.contains(&f.as_str()) {
                return ControlFlow::Break(Refusal::Denied(format!("table function {f} is not allowed")));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Refusal> {
        if self.table_functions.contains(&(relation as *const ObjectName)) {
            return ControlFlow::Continue(());
        }
        self.read(relation)
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<Refusal> {
        if let Expr::Function(f) = expr {
            let name = function_name(&f.name);
            if function_denied(&name) {
                return ControlFlow::Break(Refusal::Denied(format!("function {name} is not allowed")));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<Refusal> {
        if matches!(statement, Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_)) {
            self.dml += 1;
        }
        ControlFlow::Continue(())
    }
}

/// Checks the placeholders (`$1 … $n`, `n` = the number of parameters) and,
/// for SQLite, rewrites them to its numbered form `?1 … ?n` (SQLite reads
/// `$1` as a *named* parameter, numbered by first appearance).
fn placeholders(
    dialect: Dialect,
    sql: &str,
    tokens: &[sqlparser::tokenizer::TokenWithSpan],
    params: usize,
) -> Result<String, Refusal> {
    let mut highest = 0_usize;
    let mut found = Vec::new();
    for t in tokens {
        if let Token::Placeholder(p) = &t.token {
            let n = p
                .strip_prefix('$')
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0'))
                .and_then(|d| d.parse::<usize>().ok())
                .ok_or_else(|| Refusal::Invalid(format!("placeholder {p}: write parameters as $1, $2, …")))?;
            highest = highest.max(n);
            found.push((t.span.start, p.len(), n));
        }
    }
    if highest != params {
        return Err(Refusal::Invalid(format!(
            "the statement's highest placeholder is ${highest} but {params} parameter(s) were given"
        )));
    }
    if dialect == Dialect::Postgres || found.is_empty() {
        return Ok(sql.to_string());
    }
    // Line/column (1-based, in chars) → byte offsets.
    let mut line_starts = vec![0_usize];
    line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
    let offset = |line: u64, column: u64| -> Option<usize> {
        let start = *line_starts.get(usize::try_from(line).ok()?.checked_sub(1)?)?;
        let col = usize::try_from(column).ok()?.checked_sub(1)?;
        let rest = &sql[start..];
        Some(start + rest.char_indices().nth(col).map(|(i, _)| i).unwrap_or(rest.len()))
    };
    let mut out = String::with_capacity(sql.len());
    let mut last = 0;
    for (start, len, n) in found {
        let at = offset(start.line, start.column)
            .filter(|&at| sql.get(at..at + len).is_some_and(|s| s.starts_with('$')))
            .ok_or_else(|| Refusal::Invalid("cannot locate a placeholder in the statement".into()))?;
        out.push_str(&sql[last..at]);
        out.push('?');
        out.push_str(&n.to_string());
        last = at + len;
    }
    out.push_str(&sql[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dialect: Dialect) -> Policy {
        Policy::from_grants(
            &DatabaseGrants {
                read: vec!["users".into(), "organizations".into(), "memberships".into(), "audit.events".into()],
                write: vec!["data_exports".into(), "public.tags".into(), "main.tags".into()],
            },
            dialect,
        )
    }

    fn run(dialect: Dialect, kind: Kind, sql: &str, params: usize) -> Result<Checked, Refusal> {
        check(dialect, kind, sql, params, &policy(dialect))
    }

    #[test]
    fn allowed_statements() {
        use Kind::*;
        let cases: &[(Kind, &str, usize)] = &[
            (Read, "SELECT 1", 0),
            (Read, "select id, email from users where id = $1", 1),
            (Read, "SELECT * FROM public.users u JOIN memberships m ON m.user_id = u.id", 0),
            (Read, "SELECT * FROM users WHERE id IN (SELECT user_id FROM memberships WHERE organization_id = $1)", 1),
            (Read, "WITH m AS (SELECT * FROM memberships) SELECT * FROM m JOIN users ON users.id = m.user_id", 0),
            (Read, "WITH a AS (SELECT 1 AS x), b AS (SELECT * FROM a) SELECT * FROM b", 0),
            (Read, "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 10) SELECT * FROM t", 0),
            (Read, "SELECT id FROM users UNION SELECT id FROM organizations", 0),
            (Read, "SELECT * FROM (SELECT id FROM users) AS s", 0),
            (Read, "SELECT EXISTS (SELECT 1 FROM organizations o WHERE o.id = $1)", 1),
            (Read, "SELECT * FROM data_exports", 0), // write implies read
            (Read, "SELECT * FROM audit.events", 0),
            (Read, "SELECT * FROM generate_series(1, 3)", 0),
            (Read, "SELECT pg_sleep(0), now(), count(*) FROM users", 0),
            (Read, "VALUES (1), (2)", 0),
            (Read, "SELECT $2, $1", 2),
            (Read, "SELECT * FROM users; ", 0),
            (Write, "INSERT INTO data_exports (user_id, status) VALUES ($1, $2)", 2),
            (Write, "INSERT INTO data_exports (user_id) SELECT id FROM users WHERE email = $1", 1),
            (Write, "INSERT INTO tags (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = excluded.name", 1),
            (Write, "INSERT INTO public.tags (name) VALUES ('x') RETURNING id", 0),
            (Write, "UPDATE data_exports SET status = 'done' WHERE id = $1", 1),
            (Write, "UPDATE data_exports SET user_id = u.id FROM users u WHERE u.email = data_exports.email", 0),
            (Write, "DELETE FROM data_exports WHERE created_at < $1", 1),
            (Write, "DELETE FROM data_exports WHERE user_id IN (SELECT id FROM users WHERE NOT is_active)", 0),
            (Write, "WITH old AS (SELECT id FROM users) DELETE FROM data_exports WHERE user_id IN (SELECT id FROM old)", 0),
        ];
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            for (kind, sql, params) in cases {
                if dialect == Dialect::Sqlite && (sql.contains("audit.events") || sql.contains("public.")) {
                    continue;
                }
                let r = run(dialect, *kind, sql, *params);
                assert!(r.is_ok(), "{dialect:?} {kind:?} {sql:?} was refused: {r:?}");
            }
        }
    }

    #[test]
    fn denied_statements() {
        use Kind::*;
        let cases: &[(Kind, &str)] = &[
            (Read, "SELECT * FROM secrets"),
            (Read, "SELECT * FROM users JOIN secrets ON true"),
            (Read, "SELECT * FROM users WHERE id IN (SELECT user_id FROM secrets)"),
            (Read, "SELECT (SELECT max(id) FROM secrets)"),
            (Read, "WITH s AS (SELECT * FROM secrets) SELECT * FROM s"),
            (Read, "WITH users AS (SELECT * FROM secrets) SELECT * FROM users"),
            (Read, "WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets"),
            (Read, "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a"),
            (Read, "SELECT id FROM users UNION SELECT id FROM secrets"),
            (Read, "SELECT * FROM other.users"),
            (Read, "SELECT * FROM celer_jobs"),
            (Read, "SELECT * FROM sqlite_master"),
            (Read, "SELECT * FROM sqlite_schema"),
            (Read, "SELECT * FROM pg_catalog.pg_authid"),
            (Read, "SELECT * FROM information_schema.tables"),
            (Read, "SELECT * INTO newtable FROM users"),
            (Read, "SELECT pg_read_file('/etc/passwd')"),
            (Read, "SELECT pg_catalog.pg_read_binary_file('/etc/passwd')"),
            (Read, "SELECT * FROM pg_ls_dir('.')"),
            (Read, "SELECT lo_import('/etc/passwd')"),
            (Read, "SELECT dblink_connect('x')"),
            (Read, "SELECT current_setting('data_directory')"),
            (Read, "SELECT set_config('role', 'postgres', true)"),
            (Read, "SELECT load_extension('/tmp/evil.so')"),
            (Read, "SELECT readfile('/etc/passwd')"),
            (Read, "SELECT query_to_xml('select * from secrets', true, true, '')"),
            (Read, "DELETE FROM data_exports"),
            (Read, "WITH d AS (DELETE FROM data_exports RETURNING *) SELECT * FROM d"),
            (Write, "SELECT * FROM users"),
            (Write, "INSERT INTO users (email) VALUES ('x')"),
            (Write, "UPDATE users SET email = 'x'"),
            (Write, "DELETE FROM users"),
            (Write, "DELETE FROM celer_jobs"),
            (Write, "INSERT INTO data_exports SELECT * FROM secrets"),
            (Write, "UPDATE data_exports SET user_id = (SELECT id FROM secrets)"),
            (Write, "WITH x AS (DELETE FROM tags RETURNING id) DELETE FROM data_exports WHERE id IN (SELECT id FROM x)"),
            (Write, "CREATE TABLE x (id int)"),
            (Write, "DROP TABLE data_exports"),
            (Write, "ALTER TABLE data_exports ADD COLUMN x int"),
            (Write, "TRUNCATE data_exports"),
            (Write, "COPY data_exports FROM '/etc/passwd'"),
            (Write, "ATTACH DATABASE '/tmp/x.db' AS x"),
            (Write, "DETACH DATABASE x"),
            (Write, "PRAGMA writable_schema = 1"),
            (Write, "VACUUM"),
            (Write, "SET ROLE postgres"),
            (Write, "RESET ROLE"),
            (Write, "GRANT ALL ON users TO public"),
            (Write, "BEGIN"),
            (Write, "COMMIT"),
            (Write, "  /* hi */ rollback"),
            (Write, "CALL p()"),
        ];
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            for (kind, sql) in cases {
                let r = run(dialect, *kind, sql, 0);
                assert!(matches!(r, Err(Refusal::Denied(_))), "{dialect:?} {kind:?} {sql:?} was not denied: {r:?}");
            }
        }
    }

    #[test]
    fn invalid_statements() {
        let cases: &[(&str, usize)] = &[
            ("SELEC 1", 0),
            ("", 0),
            ("   ", 0),
            ("SELECT 1; SELECT 2", 0),
            ("SELECT * FROM users; DELETE FROM data_exports", 0),
            ("SELECT * FROM users WHERE id = ?", 1),
            ("SELECT * FROM users WHERE id = :id", 1),
            ("SELECT * FROM users WHERE id = $1", 0),
            ("SELECT * FROM users WHERE id = $1", 2),
            ("SELECT * FROM users WHERE id = $2", 1),
            ("SELECT * FROM users WHERE id = $0", 0),
        ];
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            for (sql, params) in cases {
                let r = run(dialect, Kind::Read, sql, *params);
                assert!(matches!(r, Err(Refusal::Invalid(_))), "{dialect:?} {sql:?} was not invalid: {r:?}");
            }
        }
        let deep = format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500));
        assert!(matches!(run(Dialect::Postgres, Kind::Read, &deep, 0), Err(Refusal::Invalid(_))));
        let long = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES));
        assert!(matches!(run(Dialect::Postgres, Kind::Read, &long, 0), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn tables_are_reported() {
        let c = run(Dialect::Postgres, Kind::Write, "INSERT INTO data_exports (user_id) SELECT u.id FROM users u JOIN public.memberships m ON m.user_id = u.id", 0).unwrap();
        assert_eq!(c.writes, vec!["data_exports"]);
        assert_eq!(c.reads, vec!["memberships", "users"]);
        let c = run(Dialect::Sqlite, Kind::Read, "WITH m AS (SELECT * FROM memberships) SELECT * FROM m, Users", 0).unwrap();
        assert_eq!(c.reads, vec!["memberships", "users"]);
        assert!(c.writes.is_empty());
    }

    #[test]
    fn sqlite_placeholders_become_numbered_outside_literals() {
        let c = run(
            Dialect::Sqlite,
            Kind::Read,
            "SELECT '$1', \"$2\", $2 -- $1\n , /* $1 */ $1, 'é$1', $10 FROM users WHERE name = 'it''s $3'",
            10,
        );
        // $10 with 10 params: highest is 10.
        let c = c.unwrap();
        assert_eq!(c.sql, "SELECT '$1', \"$2\", ?2 -- $1\n , /* $1 */ ?1, 'é$1', ?10 FROM users WHERE name = 'it''s $3'");
        let multi = run(Dialect::Sqlite, Kind::Read, "SELECT\n  'ü',\n\t$1,\n  $2", 2).unwrap();
        assert_eq!(multi.sql, "SELECT\n  'ü',\n\t?1,\n  ?2");
        let pg = run(Dialect::Postgres, Kind::Read, "SELECT $1, '$2'", 1).unwrap();
        assert_eq!(pg.sql, "SELECT $1, '$2'");
    }
}
