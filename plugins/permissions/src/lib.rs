//! `permissions`: invalidation of the permission cache of the seeds.
//!
//! The Django app caches "is user U a member / admin / owner of
//! organization O" under `is_member_<U>_<O>`, `is_admin_<U>_<O>` and
//! `is_owner_<U>_<O>`. `permissions.invalidate(user_id, org_id)` deletes the
//! three keys of that pair (after a membership or role change), so the next
//! check reads the database again. Deleting a key that is not there is
//! fine: a second run changes nothing.

use celer_plugin::{Context, TaskError, cache};
use serde::{Deserialize, Serialize};

celer_plugin::plugin! {
    name: "permissions",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "permissions.invalidate" => invalidate,
    }
}

#[derive(Debug, Deserialize)]
pub struct Invalidate {
    pub user_id: i64,
    pub org_id: i64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Invalidated {
    /// Keys that existed and were deleted.
    pub deleted: Vec<String>,
    /// Every key the pair has.
    pub keys: Vec<String>,
}

/// The cache keys of one (user, organization) pair.
pub fn keys(user_id: i64, org_id: i64) -> Vec<String> {
    ["is_member_", "is_admin_", "is_owner_"].iter().map(|p| format!("{p}{user_id}_{org_id}")).collect()
}

fn invalidate(ctx: &Context, Invalidate { user_id, org_id }: Invalidate) -> Result<Invalidated, TaskError> {
    let keys = keys(user_id, org_id);
    let mut deleted = Vec::new();
    for key in &keys {
        if cache::delete(key)? {
            deleted.push(key.clone());
        }
    }
    ctx.info(format!("permissions.invalidate: user {user_id} in organization {org_id}: {} keys deleted", deleted.len()));
    Ok(Invalidated { deleted, keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_keys_of_a_pair() {
        assert_eq!(keys(7, 42), vec!["is_member_7_42", "is_admin_7_42", "is_owner_7_42"]);
    }

    #[test]
    fn arguments_are_user_then_organization() {
        let a: Invalidate = celer_plugin::args::decode("[7, 42]", "{}").unwrap();
        assert_eq!((a.user_id, a.org_id), (7, 42));
        let a: Invalidate = celer_plugin::args::decode("[]", r#"{"org_id": 1, "user_id": 2}"#).unwrap();
        assert_eq!((a.user_id, a.org_id), (2, 1));
    }
}
