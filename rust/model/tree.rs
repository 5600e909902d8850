//! Speculation trees: the ancestor masks of one tree step, from a parents list.

use crate::error::{Error, Result};

/// Per node of a tree step, the bitset of the nodes it sees (its ancestors and itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeMask {
    nodes: usize,
    words: usize,
    /// `(nodes, words)` bitsets.
    bits: Vec<u64>,
    /// Depth of each node (roots are 0), `(nodes,)`.
    depth: Vec<u32>,
    /// Parent of each node (`None` for roots), `(nodes,)`.
    parent: Vec<Option<usize>>,
}

impl TreeMask {
    /// The tree of `parents`: `parents[i]` is `-1` (node `i` hangs off the existing
    /// sequence) or the index `< i` of its parent among the step's nodes.
    pub fn from_parents(parents: &[i64]) -> Result<Self> {
        let nodes = parents.len();
        let words = nodes.div_ceil(64).max(1);
        let mut t = Self {
            nodes,
            words,
            bits: vec![0; nodes * words],
            depth: Vec::with_capacity(nodes),
            parent: Vec::with_capacity(nodes),
        };
        for (i, &p) in parents.iter().enumerate() {
            let parent = match p {
                -1 => None,
                p if p >= 0 && (p as usize) < i => Some(p as usize),
                _ => {
                    return Err(Error::Config(format!(
                        "parents[{i}]={p} must be -1 or the index of an earlier token (0..{i})"
                    )))
                }
            };
            if let Some(p) = parent {
                let (src, dst) = (p * words, i * words);
                t.bits.copy_within(src..src + words, dst);
            }
            t.bits[i * words + i / 64] |= 1 << (i % 64);
            let depth = parent.map_or(0, |p| t.depth[p] + 1);
            t.depth.push(depth);
            t.parent.push(parent);
        }
        Ok(t)
    }

    /// Nodes in the tree.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The bitset of the nodes node `i` sees.
    pub fn row(&self, i: usize) -> &[u64] {
        &self.bits[i * self.words..(i + 1) * self.words]
    }

    /// Depth of node `i` (roots are 0).
    pub fn depth(&self, i: usize) -> u32 {
        self.depth[i]
    }

    /// Parent of node `i`, `None` for a root.
    pub fn parent(&self, i: usize) -> Option<usize> {
        self.parent[i]
    }

    /// Checks that `path` is a root-to-node chain of this tree (it may be empty).
    pub fn check_path(&self, path: &[usize]) -> Result<()> {
        let mut prev = None;
        for (k, &node) in path.iter().enumerate() {
            if node >= self.nodes {
                return Err(Error::Config(format!(
                    "path[{k}]={node} is not a node of the pending tree of {} tokens",
                    self.nodes
                )));
            }
            if self.parent[node] != prev {
                let want = prev.map_or("a root (parent -1)".into(), |p| {
                    format!("a child of node {p}")
                });
                return Err(Error::Config(format!(
                    "path[{k}]={node} is not {want}: a path must run from a root down one branch"
                )));
            }
            prev = Some(node);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_ancestors_and_self() {
        let t = TreeMask::from_parents(&[-1, 0, 0, 1, -1]).unwrap();
        let sees = |i: usize| {
            (0..5)
                .filter(|&j| t.row(i)[0] >> j & 1 == 1)
                .collect::<Vec<_>>()
        };
        assert_eq!(sees(3), vec![0, 1, 3]);
        assert_eq!(sees(2), vec![0, 2]);
        assert_eq!(sees(4), vec![4]);
        assert_eq!((t.depth(3), t.depth(4)), (2, 0));
        assert!(t.check_path(&[0, 1, 3]).is_ok());
        assert!(t.check_path(&[1]).is_err());
        assert!(t.check_path(&[0, 2, 3]).is_err());
        assert!(TreeMask::from_parents(&[0]).is_err());
        assert!(TreeMask::from_parents(&[-2]).is_err());
    }
}
