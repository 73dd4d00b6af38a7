//! `[celery] routes`: the app's `task_routes`, so that a follow-up whose
//! signature names no queue (a link, the next step of a chain) goes where
//! the app's own `.delay()` would have sent it. As in Celery's `MapRoute`,
//! a key without `*` is a task name and a key with one is a shell-style
//! pattern (`fnmatch`: `*`, `?`, `[seq]`, `[!seq]`). Celery tries patterns
//! in the order the app wrote them; a TOML table has no order, so celer
//! tries the most specific first (most literal characters, then the name),
//! which gives the same answer for the usual `proj.mail.*` beside
//! `proj.*`.

use std::collections::BTreeMap;

/// Task name → queue, from `[celery] routes`.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    exact: BTreeMap<String, String>,
    /// `(pattern, queue)`, most specific first.
    patterns: Vec<(Vec<char>, String)>,
}

impl Routes {
    /// Sorts the table into names and ordered patterns once, at start-up,
    /// rather than on every follow-up.
    pub fn new(routes: &BTreeMap<String, String>) -> Self {
        let (patterns, exact): (BTreeMap<_, _>, BTreeMap<_, _>) = routes.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(k, _)| k.contains('*'));
        let mut patterns: Vec<(Vec<char>, String)> = patterns.into_iter().map(|(k, v)| (k.chars().collect(), v)).collect();
        let literal = |p: &[char]| p.iter().filter(|c| !matches!(c, '*' | '?' | '[' | ']')).count();
        patterns.sort_by(|(a, _), (b, _)| literal(b).cmp(&literal(a)).then_with(|| a.cmp(b)));
        Routes { exact, patterns }
    }

    /// The queue the routes give `task`, if any.
    pub fn queue_of(&self, task: &str) -> Option<&str> {
        if let Some(q) = self.exact.get(task) {
            return Some(q);
        }
        let name: Vec<char> = task.chars().collect();
        self.patterns.iter().find(|(p, _)| fnmatch(p, &name)).map(|(_, q)| q.as_str())
    }
}

/// Python's `fnmatch.fnmatchcase`: `*` any run of characters (dots too),
/// `?` one, `[seq]` / `[!seq]` one in (or not in) the set, with `a-z`
/// ranges; a `[` without its `]` is a literal.
fn fnmatch(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where to resume after the last `*`: its pattern position, and the
    // name position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match class(&pattern[p..], name[n]) {
                Some((true, len)) => Some(len),
                Some((false, _)) => None,
                None => (name[n] == '[').then_some(1),
            },
            Some(c) => (*c == name[n]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                p += len;
                n += 1;
            }
            (None, Some((sp, sn))) => {
                star = Some((sp, sn + 1));
                p = sp + 1;
                n = sn + 1;
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// A `[…]` set at the start of `pattern`: whether `c` is in it and the
/// set's length; `None` when the `[` has no closing `]`.
fn class(pattern: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negated = matches!(pattern.get(i), Some('!'));
    if negated {
        i += 1;
    }
    // A `]` first in the set is a member, not its end.
    let start = i;
    let mut hit = false;
    while let Some(&x) = pattern.get(i) {
        if x == ']' && i > start {
            return Some((hit != negated, i + 1));
        }
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|y| *y != ']') {
            let y = pattern[i + 2];
            hit |= x <= c && c <= y;
            i += 3;
        } else {
            hit |= x == c;
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        fnmatch(&pattern.chars().collect::<Vec<_>>(), &name.chars().collect::<Vec<_>>())
    }

    /// The cases Python's `fnmatch.fnmatchcase` decides (checked against
    /// Python 3.11).
    #[test]
    fn patterns_match_as_pythons_fnmatch() {
        assert!(matches("proj.mail.*", "proj.mail.send"));
        assert!(matches("proj.mail.*", "proj.mail."));
        assert!(!matches("proj.mail.*", "proj.mailer.send"));
        assert!(matches("*.mail.*", "proj.mail.send"));
        assert!(matches("proj.*.send", "proj.mail.urgent.send"));
        assert!(!matches("proj.*.send", "proj.mail.sender"));
        assert!(matches("proj.task?", "proj.task1"));
        assert!(!matches("proj.task?", "proj.task12"));
        assert!(matches("proj.task[0-9]*", "proj.task3x"));
        assert!(!matches("proj.task[!0-9]*", "proj.task3x"));
        assert!(matches("proj.task[!0-9]*", "proj.taskx"));
        assert!(matches("a[]]b*", "a]b"));
        assert!(matches("a[b*", "a[bc"));
        assert!(matches("**", ""));
        assert!(!matches("a*b*c", "abx"));
        assert!(matches("a*b*c", "a-b-b-c"));
    }

    /// Exact names first, then the most specific pattern, whatever the
    /// order of the table.
    #[test]
    fn the_exact_name_then_the_most_specific_pattern_wins() {
        let table: BTreeMap<String, String> = [("proj.*", "default-proj"), ("proj.mail.*", "mail"), ("proj.mail.urgent", "urgent"), ("*.reports.*", "reports")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let routes = Routes::new(&table);
        assert_eq!(routes.queue_of("proj.mail.urgent"), Some("urgent"));
        assert_eq!(routes.queue_of("proj.mail.send"), Some("mail"));
        assert_eq!(routes.queue_of("proj.reports.weekly"), Some("reports"));
        assert_eq!(routes.queue_of("proj.add"), Some("default-proj"));
        assert_eq!(routes.queue_of("other.add"), None);
    }
}
