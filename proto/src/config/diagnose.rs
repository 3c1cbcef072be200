//! Reading the TOML text with errors that name the key.
//!
//! The `toml` crate reports a wrong type with the message and the byte span
//! only. So the text is first parsed into a table (syntax errors, reported with
//! line and column), then deserialized; if that fails, each section's keys are
//! tried one by one against the section's type, which finds the key at fault:
//! `hypervisor.qemu.default_memory: invalid type: string "big", expected u64`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Agent, Config, ConfigError, Qemu, Runtime};

/// Text to [`Config`] (not yet validated).
pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| {
                let (line, col) = line_col(text, s.start);
                format!(" at line {line}, column {col}")
            })
            .unwrap_or_default();
        let message: Vec<&str> = e.message().lines().map(str::trim).collect();
        ConfigError::Parse {
            file: None,
            key: None,
            problem: format!("TOML syntax error{at}: {}", message.join("; ")),
        }
    })?;
    match Config::deserialize(toml::Value::Table(table.clone())) {
        Ok(cfg) => Ok(cfg),
        Err(e) => Err(find_key(&table).unwrap_or_else(|| ConfigError::Parse {
            file: None,
            key: None,
            problem: e.message().trim().to_string(),
        })),
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The first problem, named by its key; `None` if none is found this way.
fn find_key(table: &toml::Table) -> Option<ConfigError> {
    for (k, v) in table {
        let problem = match k.as_str() {
            "hypervisor" => sections(k, v, &[("qemu", section::<Qemu>)]),
            "agent" => sections(k, v, &[("kata", section::<Agent>)]),
            "runtime" => section::<Runtime>(k, v),
            _ => Err(at(
                k,
                "unknown key (kata-rs reads [hypervisor.qemu], [agent.kata] and [runtime])",
            )),
        };
        if let Err(e) = problem {
            return Some(e);
        }
    }
    None
}

/// Checks one section's value.
type SectionCheck = fn(&str, &toml::Value) -> Result<(), ConfigError>;

/// `[name.*]` holding the named sub-sections only.
fn sections(
    name: &str,
    v: &toml::Value,
    known: &[(&str, SectionCheck)],
) -> Result<(), ConfigError> {
    let t = v
        .as_table()
        .ok_or_else(|| at(name, format!("expected a table, found {}", v.type_str())))?;
    for (k, sub) in t {
        let path = format!("{name}.{k}");
        match known.iter().find(|(n, _)| n == k) {
            Some((_, check)) => check(&path, sub)?,
            None => {
                let names: Vec<String> =
                    known.iter().map(|(n, _)| format!("[{name}.{n}]")).collect();
                return Err(at(
                    path,
                    format!("unknown section (kata-rs reads {} only)", names.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// A section of type `T`: each key on its own, so the error names it.
fn section<T>(name: &str, v: &toml::Value) -> Result<(), ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let t = v
        .as_table()
        .ok_or_else(|| at(name, format!("expected a table, found {}", v.type_str())))?;
    let known = toml::Table::try_from(T::default()).unwrap_or_default();
    for (k, value) in t {
        if !known.contains_key(k) {
            let hint = closest(k, known.keys().map(String::as_str))
                .map(|c| format!(" (did you mean {c}?)"))
                .unwrap_or_default();
            return Err(at(format!("{name}.{k}"), format!("unknown key{hint}")));
        }
        let mut one = toml::Table::new();
        one.insert(k.clone(), value.clone());
        if let Err(e) = T::deserialize(toml::Value::Table(one)) {
            return Err(at(format!("{name}.{k}"), e.message().trim()));
        }
    }
    Ok(())
}

/// A problem with `key`.
fn at(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Parse {
        file: None,
        key: Some(key.into()),
        problem: problem.into(),
    }
}

/// The known key nearest to a misspelt one (at most 2 edits away).
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_and_hint() {
        assert_eq!(edit_distance("default_memroy", "default_memory"), 2);
        assert_eq!(
            closest(
                "default_memroy",
                ["default_memory", "default_vcpus"].into_iter()
            ),
            Some("default_memory")
        );
        assert_eq!(closest("zzz", ["default_memory"].into_iter()), None);
    }

    #[test]
    fn syntax_error_has_line() {
        let e = parse("[runtime]\nenable_debug = \n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("TOML syntax error at line 2"), "{e}");
    }
}
