//! `list_groups` and `list_files` results: the lines printed, and what the shell remembers of
//! them for completion.
//!
//! Piped or redirected, the lines are exactly the TAB-separated ones of the SPEC. In the
//! interactive shell ([`Listings::set_tables`]), they are aligned columns with a header and
//! sizes such as `1.4 MiB`. Every listing also updates the group ids and file names that Tab
//! completes. Pure data and text; the session core owns one [`Listings`].

use std::collections::{BTreeMap, BTreeSet};

use unicode_width::UnicodeWidthStr;

use super::progress::size_text;
use crate::wire::tracker_link::{FileInfo, GroupInfo, Relation};
use crate::wire::{FileName, GroupId};

/// Groups whose file lists are remembered at most (a listing of yet another group forgets the
/// first in order of group id).
pub const MAX_GROUPS_WITH_FILES: usize = 64;
/// Hex digits of a file's SHA1 shown in a table (the full digest is in the piped output).
const SHA1_SHOWN: usize = 12;

/// What the last listings said, and how to print them.
#[derive(Debug, Default, Clone)]
pub struct Listings {
    tables: bool,
    groups: BTreeSet<GroupId>,
    files: BTreeMap<GroupId, BTreeSet<FileName>>,
}

impl Listings {
    /// Aligned tables (for a person at a terminal) instead of the SPEC's TAB-separated lines.
    pub fn set_tables(&mut self, on: bool) {
        self.tables = on;
    }

    /// Group ids of the last `list_groups`.
    pub fn groups(&self) -> &BTreeSet<GroupId> {
        &self.groups
    }

    /// File names of each group's last `list_files`.
    pub fn files(&self) -> &BTreeMap<GroupId, BTreeSet<FileName>> {
        &self.files
    }

    /// Records a `list_groups` answer and returns the lines to print.
    pub fn on_groups(&mut self, groups: &[GroupInfo]) -> Vec<String> {
        self.groups = groups.iter().map(|g| g.group.clone()).collect();
        let relation = |g: &GroupInfo| match g.relation {
            Relation::Owner => "owner",
            Relation::Member => "member",
            Relation::Requested => "requested",
            Relation::None => "-",
        };
        if !self.tables {
            return groups
                .iter()
                .map(|g| {
                    format!(
                        "{}\towner={}\tmembers={}\tyou={}",
                        g.group,
                        g.owner,
                        g.n_members,
                        relation(g)
                    )
                })
                .collect();
        }
        if groups.is_empty() {
            return vec!["(no groups yet: create_group <group_id> makes one)".to_owned()];
        }
        let rows = groups
            .iter()
            .map(|g| {
                vec![
                    g.group.to_string(),
                    g.owner.to_string(),
                    g.n_members.to_string(),
                    relation(g).to_owned(),
                ]
            })
            .collect();
        table(&["GROUP", "OWNER", "MEMBERS", "YOU"], &[2], rows)
    }

    /// Records a `list_files` answer for `group` and returns the lines to print.
    pub fn on_files(&mut self, group: &GroupId, files: &[FileInfo]) -> Vec<String> {
        if !self.files.contains_key(group) && self.files.len() >= MAX_GROUPS_WITH_FILES {
            self.files.pop_first();
        }
        self.files.insert(
            group.clone(),
            files.iter().map(|f| f.name.clone()).collect(),
        );
        if !self.tables {
            return files
                .iter()
                .map(|f| {
                    format!(
                        "{}\t{}\t{}\t{}\t{}",
                        f.name, f.size, f.n_online, f.n_sharers, f.file_sha1
                    )
                })
                .collect();
        }
        if files.is_empty() {
            return vec![format!("(no files shared in group {group})")];
        }
        let rows = files
            .iter()
            .map(|f| {
                let sha1 = f.file_sha1.to_string();
                vec![
                    f.name.to_string(),
                    size_text(f.size),
                    f.n_online.to_string(),
                    f.n_sharers.to_string(),
                    sha1[..SHA1_SHOWN.min(sha1.len())].to_owned(),
                ]
            })
            .collect();
        table(
            &["NAME", "SIZE", "ONLINE", "SHARERS", "SHA1"],
            &[1, 2, 3],
            rows,
        )
    }
}

/// Rows under a header, columns two spaces apart and padded by display width; the columns in
/// `right` are right-aligned (numbers). Control characters cannot reach the terminal (ids and
/// names exclude them, but a table is no place to trust that).
fn table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> Vec<String> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let mut all: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    all.extend(
        rows.into_iter()
            .map(|r| r.iter().map(|c| clean(c)).collect()),
    );
    let n_cols = header.len();
    let widths: Vec<usize> = (0..n_cols)
        .map(|i| all.iter().map(|r| r[i].width()).max().unwrap_or(0))
        .collect();
    all.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.width());
                if i > 0 {
                    line.push_str("  ");
                }
                if right.contains(&i) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if i + 1 < n_cols {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Sha1Digest, UserId};

    fn gi(group: &str, owner: &str, n: u32, relation: Relation) -> GroupInfo {
        GroupInfo {
            group: GroupId::new(group).unwrap(),
            owner: UserId::new(owner).unwrap(),
            n_members: n,
            relation,
        }
    }

    fn fi(name: &str, size: u64) -> FileInfo {
        FileInfo {
            name: FileName::new(name).unwrap(),
            size,
            n_online: 1,
            n_sharers: 12,
            file_sha1: Sha1Digest([0xab; 20]),
        }
    }

    #[test]
    fn piped_output_is_the_spec_lines() {
        let mut l = Listings::default();
        let groups = [
            gi("team", "alice", 3, Relation::Owner),
            gi("x", "bob", 1, Relation::None),
        ];
        assert_eq!(
            l.on_groups(&groups),
            [
                "team\towner=alice\tmembers=3\tyou=owner",
                "x\towner=bob\tmembers=1\tyou=-"
            ]
        );
        let g = GroupId::new("team").unwrap();
        assert_eq!(
            l.on_files(&g, &[fi("a b.txt", 1_500_000)]),
            [format!("a b.txt\t1500000\t1\t12\t{}", "ab".repeat(20))]
        );
        assert!(l.on_groups(&[]).is_empty());
        assert!(l.on_files(&g, &[]).is_empty());
    }

    #[test]
    fn tables_align_by_display_width() {
        let mut l = Listings::default();
        l.set_tables(true);
        let lines = l.on_groups(&[
            gi("team", "alice", 3, Relation::Owner),
            gi("映画", "bob", 12, Relation::Requested),
        ]);
        assert_eq!(
            lines,
            [
                "GROUP  OWNER  MEMBERS  YOU",
                "team   alice        3  owner",
                "映画   bob         12  requested",
            ]
        );
        let g = GroupId::new("team").unwrap();
        let lines = l.on_files(&g, &[fi("notes 2026.pdf", 1_500_000), fi("b", 10)]);
        assert_eq!(
            lines,
            [
                "NAME               SIZE  ONLINE  SHARERS  SHA1",
                "notes 2026.pdf  1.4 MiB       1       12  abababababab",
                "b                  10 B       1       12  abababababab",
            ]
        );
        assert_eq!(l.on_files(&g, &[]), ["(no files shared in group team)"]);
    }

    #[test]
    fn listings_feed_completion_and_stay_bounded() {
        let mut l = Listings::default();
        l.on_groups(&[
            gi("a", "u", 1, Relation::Member),
            gi("b", "u", 1, Relation::None),
        ]);
        assert_eq!(l.groups().len(), 2);
        l.on_groups(&[gi("c", "u", 1, Relation::Member)]);
        assert_eq!(
            l.groups().iter().map(|g| g.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        for i in 0..MAX_GROUPS_WITH_FILES + 5 {
            let g = GroupId::new(&format!("g{i:03}")).unwrap();
            l.on_files(&g, &[fi("f", 1)]);
        }
        assert_eq!(l.files().len(), MAX_GROUPS_WITH_FILES);
    }
}
