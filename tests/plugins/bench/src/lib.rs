//! `bench`: the two tasks of the Celery peer benchmark, with the same names
//! and the same work as `shared/bench/celery/tasks.py`, so that the figures
//! compare like with like.

use std::collections::HashSet;

use celer_plugin::{Context, TaskError};
use serde::{Deserialize, Serialize};

celer_plugin::plugin! {
    name: "bench",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "bench.noop" => noop,
        "bench.json_transform" => json_transform,
    }
}

/// Returns `null`.
fn noop(_: &Context, (): ()) -> Result<(), TaskError> {
    Ok(())
}

#[derive(Deserialize)]
struct Args {
    /// The order document, as a JSON string (as Celery's task gets it).
    doc: String,
}

#[derive(Deserialize)]
struct Order {
    id: String,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    sku: String,
    qty: u64,
    unit_cents: u64,
}

#[derive(Serialize)]
struct Summary {
    id: String,
    lines: usize,
    units: u64,
    total_cents: u64,
    skus: usize,
}

/// Parses an order document and summarises it: a typical light job.
fn json_transform(_: &Context, Args { doc }: Args) -> Result<Summary, TaskError> {
    let order: Order = serde_json::from_str(&doc).map_err(|e| TaskError::fail(format!("not an order: {e}")))?;
    let items = &order.items;
    Ok(Summary {
        id: order.id.clone(),
        lines: items.len(),
        units: items.iter().map(|i| i.qty).sum(),
        total_cents: items.iter().map(|i| i.qty * i.unit_cents).sum(),
        skus: items.iter().map(|i| i.sku.as_str()).collect::<HashSet<_>>().len(),
    })
}
