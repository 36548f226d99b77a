//! File descriptors: the one resource that devices, handshakes in progress and operator
//! API clients all draw from. Each gets its own budget, and the budgets together fit
//! the process's open-file limit, so that no kind of connection can take the others'
//! room (SECURITY.md, "Limits").
//!
//! ```text
//!  open-file limit (ulimit -n, soft raised to hard at start)
//!  ├── max_connections          devices past the handshake (unset: what is left)
//!  ├── max_handshakes           connections not yet authenticated
//!  ├── api_max_connections      operator API, WebSocket streams included
//!  └── FD_RESERVE               store (writer + readers), listeners, runtime, stdio
//! ```

use crate::config::{Config, ConfigError};

/// Descriptors kept for everything that is not a connection: the store's writer and
/// its read connections (three files each with WAL: [`crate::store::MAX_READERS`]
/// readers), two listeners, the runtime's poller and wakers, signals, stdio, the token
/// and PEM files while they are read, and one for a connection accepted only to be
/// closed because its budget is full.
pub(crate) const FD_RESERVE: usize = 64;

/// What `max_connections` is when the open-file limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 19_000;

/// Connection budgets in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Devices past the TLS handshake.
    pub max_connections: usize,
    /// The open-file limit in force (after raising the soft limit), if known.
    pub open_files: Option<u64>,
}

/// Raises the soft open-file limit to the hard one and returns the limit now in force.
/// The soft default (often 1024) protects programs that do not expect many files; a
/// gateway does, and its budgets below keep it inside the limit.
pub fn raise_open_file_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// Descriptors the budgets other than `max_connections` can take.
fn others(config: &Config) -> usize {
    let api = if config.api_listen.is_some() {
        config.api_max_connections
    } else {
        0
    };
    config.max_handshakes + api + FD_RESERVE
}

/// The budgets for `config` under an open-file limit of `open_files` (`None`: not
/// known). A `max_connections` that does not fit is an error naming what to change.
pub fn plan(config: &Config, open_files: Option<u64>) -> Result<Budgets, ConfigError> {
    let others = others(config);
    let Some(limit) = open_files else {
        return Ok(Budgets {
            max_connections: config.max_connections.unwrap_or(FALLBACK_MAX_CONNECTIONS),
            open_files,
        });
    };
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let room = limit_usize.saturating_sub(others);
    let max_connections = match config.max_connections {
        Some(n) if n > room => {
            return Err(ConfigError::Invalid {
                name: "max_connections",
                problem: format!(
                    "{n} devices + max_handshakes {} + api_max_connections {} + {FD_RESERVE} \
                     reserved need {} file descriptors, but the open-file limit is {limit} \
                     (ulimit -n): set max_connections to at most {room}, lower the other \
                     budgets, or raise the limit",
                    config.max_handshakes,
                    config.api_max_connections,
                    n + others,
                ),
            });
        }
        Some(n) => n,
        None if room == 0 => {
            return Err(ConfigError::Invalid {
                name: "max_handshakes",
                problem: format!(
                    "max_handshakes {} + api_max_connections {} + {FD_RESERVE} reserved \
                     leave no room for devices under the open-file limit of {limit} \
                     (ulimit -n): lower them or raise the limit",
                    config.max_handshakes, config.api_max_connections
                ),
            });
        }
        None => room,
    };
    Ok(Budgets {
        max_connections,
        open_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_max_connections_takes_what_the_limit_leaves() {
        let c = Config::default();
        let b = plan(&c, Some(20_000)).unwrap();
        assert_eq!(b.max_connections, 20_000 - 1024 - 128 - FD_RESERVE);
        let no_api = Config {
            api_listen: None,
            ..Config::default()
        };
        assert_eq!(
            plan(&no_api, Some(20_000)).unwrap().max_connections,
            20_000 - 1024 - FD_RESERVE
        );
        assert_eq!(plan(&c, None).unwrap().max_connections, 19_000);
    }

    #[test]
    fn budgets_that_do_not_fit_are_refused_with_what_would() {
        let c = Config {
            max_connections: Some(19_000),
            ..Config::default()
        };
        let err = plan(&c, Some(20_000)).unwrap_err().to_string();
        assert!(err.contains("at most 18784"), "{err}");
        let tiny = Config::default();
        let err = plan(&tiny, Some(1_000)).unwrap_err().to_string();
        assert!(err.contains("max_handshakes"), "{err}");
        let fits = Config {
            max_connections: Some(64),
            max_handshakes: 32,
            api_max_connections: 16,
            ..Config::default()
        };
        assert_eq!(plan(&fits, Some(256)).unwrap().max_connections, 64);
    }
}
