//! Another tool's SQLite database, opened strictly read-only (`SQLITE_OPEN_READ_ONLY` and
//! `PRAGMA query_only`, so neither amqctl nor a bug in it can change the file), with tables and
//! columns found by name tolerantly: case, `_` and `-` are ignored (`clientId`, `client_id`,
//! `CLIENTID` are one column).

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

/// Opens `path` read-only. It waits up to 2 s for a writer (the Kiro tools keep their database
/// open) and never writes the database.
///
/// A read-only connection to a WAL-mode database creates the `-wal` and `-shm` companion files
/// when they are missing, and cannot remove them afterwards. Their absence means no connection
/// has the database open and the WAL holds nothing: such a database is then opened as
/// `immutable`, which reads the main file alone and leaves nothing behind.
pub fn open(path: &Path) -> Result<Connection, String> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let companion = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p).exists()
    };
    let idle_wal = is_wal(path) && !companion("-wal") && !companion("-shm");
    let opened = if idle_wal {
        Connection::open_with_flags(immutable_uri(path), flags | OpenFlags::SQLITE_OPEN_URI)
    } else {
        Connection::open_with_flags(path, flags)
    };
    let conn = opened.map_err(|e| format!("cannot open it as SQLite: {e}"))?;
    conn.busy_timeout(Duration::from_secs(2)).map_err(|e| format!("cannot read it as SQLite: {e}"))?;
    conn.pragma_update(None, "query_only", true).map_err(|e| format!("cannot read it as SQLite: {e}"))?;
    Ok(conn)
}

/// Whether the database header says WAL mode (file format versions 2 at offsets 18 and 19).
fn is_wal(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header)).is_ok()
        && header[18] == 2
        && header[19] == 2
}

/// `file:PATH?immutable=1`, the path percent-encoded.
fn immutable_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// A name without case, `_` and `-`: how tables and columns are compared.
pub fn norm(name: &str) -> String {
    name.chars().filter(|c| *c != '_' && *c != '-').flat_map(char::to_lowercase).collect()
}

/// The database's tables and views, by name.
pub fn tables(conn: &Connection) -> Result<Vec<String>, String> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")
        .map_err(|e| format!("cannot read it as SQLite: {e}"))?;
    let names = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read it as SQLite: {e}"))?;
    Ok(names)
}

/// The table among `tables` whose name is `want` (compared by [`norm`]).
pub fn find<'a>(names: &'a [String], want: &str) -> Option<&'a str> {
    let want = norm(want);
    names.iter().map(String::as_str).find(|n| norm(n) == want)
}

/// A table's columns, by name.
pub fn columns(conn: &Connection, table: &str) -> Result<Vec<String>, String> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1)")
        .map_err(|e| format!("cannot read table {table}: {e}"))?;
    let names = stmt
        .query_map([table], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read table {table}: {e}"))?;
    Ok(names)
}

/// The first column of `columns` named like one of `wants` (compared by [`norm`]).
pub fn column<'a>(columns: &'a [String], wants: &[&str]) -> Option<&'a str> {
    wants.iter().find_map(|w| find(columns, w))
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Every row of `table`, with the values of `columns` (`None`: the column is absent, read as NULL).
pub fn rows(conn: &Connection, table: &str, columns: &[Option<&str>]) -> Result<Vec<Vec<Value>>, String> {
    let list: Vec<String> =
        columns.iter().map(|c| c.map(quote).unwrap_or_else(|| "NULL".to_string())).collect();
    let sql = format!("SELECT {} FROM {} ORDER BY rowid", list.join(", "), quote(table));
    // A view has no rowid: then the table's own order.
    let sql_plain = format!("SELECT {} FROM {}", list.join(", "), quote(table));
    let mut stmt = conn
        .prepare(&sql)
        .or_else(|_| conn.prepare(&sql_plain))
        .map_err(|e| format!("cannot read table {table}: {e}"))?;
    let n = columns.len();
    stmt.query_map([], |row| (0..n).map(|i| row.get::<_, Value>(i)).collect::<Result<Vec<_>, _>>())
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read table {table}: {e}"))
}

/// A value as trimmed text: TEXT, a UTF-8 BLOB or a number; `None` for NULL, an empty string
/// or a BLOB that is not UTF-8.
pub fn text(v: &Value) -> Option<String> {
    let s = match v {
        Value::Null => return None,
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Text(t) => t.clone(),
        Value::Blob(b) => String::from_utf8(b.clone()).ok()?,
    };
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// A value as a flag: 0, `false`, `no`, `off` (any case) are false; NULL is `default`;
/// everything else is true.
pub fn flag(v: &Value, default: bool) -> bool {
    match v {
        Value::Null => default,
        Value::Integer(i) => *i != 0,
        Value::Real(r) => *r != 0.0,
        _ => match text(v) {
            None => default,
            Some(s) => !matches!(s.to_ascii_lowercase().as_str(), "0" | "false" | "no" | "off"),
        },
    }
}
