//! `celer dead list|retry|purge`: the dead-letter queue, for the operator
//! who has fixed the cause and wants the jobs back, or wants them gone.

use std::process::ExitCode;

use clap::Subcommand;

use celer::config::Config;

use super::{CliError, open_broker, print_json};

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// Dead letters, newest first, as JSON.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Put dead letters back on their queue with a fresh retry budget.
    Retry {
        /// Job ids; with none, --all is required.
        ids: Vec<String>,
        /// Retry every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete every dead letter.
    Purge,
}

/// `celer dead`: what an operator looks at and acts on when jobs fail for good.
pub async fn run(config: &Config, command: DeadCommand) -> Result<ExitCode, CliError> {
    let broker = open_broker(config).await?;
    match command {
        DeadCommand::List { limit } => print_json(&broker.dead_list(limit).await?)?,
        DeadCommand::Retry { ids, all } => {
            if ids.is_empty() && !all {
                return Err(CliError::Usage("name the job ids to retry, or pass --all".into()));
            }
            let n = broker.dead_retry(&ids).await?;
            print_json(&serde_json::json!({"retried": n}))?;
        }
        DeadCommand::Purge => {
            let n = broker.dead_purge().await?;
            print_json(&serde_json::json!({"purged": n}))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
