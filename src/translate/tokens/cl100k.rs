//! An exact, compact cl100k_base token counter: tiktoken's pre-tokeniser and byte-pair merge,
//! counting the tokens of `encode_ordinary` without producing them (pieces longer than
//! [`CHUNK`] — 4 KiB without a space, never seen in ordinary text — are merged in chunks, in
//! linear time, and may differ from tiktoken by a token a chunk).
//!
//! The vocabulary, `cl100k_base.bin`, is OpenAI's cl100k_base
//! (<https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken>, sha256
//! `223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7`, published with
//! [tiktoken](https://github.com/openai/tiktoken) under the MIT licence, © 2022 OpenAI, Shantanu
//! Jain) re-encoded without base64: the number of tokens as a little-endian u32, then each
//! token's length in bytes (one byte per token, in rank order), then all the tokens' bytes,
//! concatenated in rank order. The bytes are used in place; building the tables allocates only the
//! offsets by rank (0.4 MB) and the hash table (1 MiB). `generated_vocabulary` in
//! `cl100k_tests.rs` checks the file against tiktoken-rs and regenerates it.
//!
//! Pre-tokenisation is tiktoken's cl100k pattern as tiktoken-rs 0.12 compiles it,
//! `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`,
//! hand-written: every position starts a match, so the pieces partition the text and
//! [`piece_end`] only has to find where each one ends. `\p{L}`, `\p{N}` and `\s` come from
//! regex-syntax's tables (`unicode.rs`, generated).

use super::unicode::NON_ASCII;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;

static VOCABULARY: &[u8] = include_bytes!("cl100k_base.bin");

pub(super) type Rank = u32;
/// No such token.
pub(super) const NONE: Rank = Rank::MAX;

/// The hash table: 2^18 u32 slots (load 0.38), each `tag << RANK_BITS | rank`, or EMPTY.
const SLOT_BITS: u32 = 18;
const SLOTS: usize = 1 << SLOT_BITS;
const RANK_BITS: u32 = 17;
const RANK_MASK: u32 = (1 << RANK_BITS) - 1;
/// Unused hash bits kept in the slot, so that a probe rarely reads a token's bytes in vain.
const TAG_BITS: u32 = 32 - RANK_BITS;
/// Never a real slot: its rank bits are RANK_MASK, above every rank.
const EMPTY: u32 = u32::MAX;
/// Pieces shorter than this merge in place on the stack (quadratic, like tiktoken below 100
/// bytes); longer ones with a heap, in O(n log n).
const SMALL: usize = 128;
/// Pieces longer than this are merged in chunks of at most this many bytes, each cut back to a
/// character boundary, as tiktoken's users cut long runs without whitespace before encoding
/// (Meta's Llama 3 tokenizer at 25,000 characters, after tiktoken issue 195): the work is then
/// linear in the piece's length, and a chunk's merge (its parts table, its heap) stays in the
/// caches. One long piece merged whole — a megabyte of one letter — costs O(n log n) over
/// tables far larger than the caches. For 1.18 MB without a space, release build: one letter
/// 386 → 160 ms, random letters 670 → 148 ms, spaces 542 → 184 ms (prose: 4 ms).
///
/// The count of such a piece may differ from tiktoken's by the tokens a merge across a cut
/// would have joined: at most one a cut for the runs measured (see
/// `chunked_counts_stay_close_to_the_whole_merge`). Pieces this long do not occur in prose or
/// code (a run of letters, of punctuation or of whitespace longer than 4 KiB), so every count
/// of ordinary text stays exact.
pub(super) const CHUNK: usize = 4096;

pub(super) struct Vocabulary {
    /// Every token's bytes, concatenated in rank order.
    bytes: &'static [u8],
    /// Token `r` is `bytes[offsets[r]..offsets[r + 1]]`.
    offsets: Box<[u32]>,
    slots: Box<[u32; SLOTS]>,
    longest: usize,
}

/// The vocabulary, built on first use (~3 ms).
pub(super) fn vocabulary() -> &'static Vocabulary {
    static V: OnceLock<Vocabulary> = OnceLock::new();
    V.get_or_init(|| Vocabulary::build(VOCABULARY))
}

const K: u64 = 0xf135_7aea_2e62_a9c5;

fn u32_le(b: &[u8]) -> u64 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
}

fn u64_le(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// FxHash-style multiply-and-fold over (possibly overlapping) words; the length is mixed in
/// first, so the overlaps do not matter.
#[inline(always)]
fn hash(b: &[u8]) -> u64 {
    let n = b.len();
    let mut h = (n as u64).wrapping_mul(K);
    if n <= 8 {
        let w = if n >= 4 {
            u32_le(b) | (u32_le(&b[n - 4..]) << 32)
        } else if n > 0 {
            b[0] as u64 | (b[n / 2] as u64) << 8 | (b[n - 1] as u64) << 16
        } else {
            0
        };
        h = (h ^ w).wrapping_mul(K);
    } else {
        let mut i = 0;
        while i + 8 < n {
            h = (h.rotate_left(5) ^ u64_le(&b[i..])).wrapping_mul(K);
            i += 8;
        }
        h = (h.rotate_left(5) ^ u64_le(&b[n - 8..])).wrapping_mul(K);
    }
    (h ^ (h >> 29)).wrapping_mul(K)
}

/// (first slot, tag bits) of a hash: its top bits, then the next ones.
#[inline]
fn slot_and_tag(h: u64) -> (usize, u32) {
    let slot = (h >> (64 - SLOT_BITS)) as usize;
    let tag = (h >> (64 - SLOT_BITS - TAG_BITS)) as u32 & ((1 << TAG_BITS) - 1);
    (slot, tag << RANK_BITS)
}

impl Vocabulary {
    fn build(blob: &'static [u8]) -> Self {
        let n = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        assert!(n < RANK_MASK as usize && 2 * n < SLOTS, "vocabulary too large: {n}");
        let (lengths, bytes) = blob[4..].split_at(n);
        let mut offsets = Vec::with_capacity(n + 1);
        let mut at = 0u32;
        offsets.push(at);
        for &len in lengths {
            at += len as u32;
            offsets.push(at);
        }
        assert_eq!(at as usize, bytes.len(), "vocabulary lengths and bytes disagree");
        let slots: Box<[u32; SLOTS]> = vec![EMPTY; SLOTS].into_boxed_slice().try_into().expect("SLOTS");
        let mut v = Vocabulary {
            bytes,
            offsets: offsets.into_boxed_slice(),
            slots,
            longest: lengths.iter().copied().max().unwrap_or(0) as usize,
        };
        for rank in 0..n as Rank {
            let (mut i, tag) = slot_and_tag(hash(v.token(rank)));
            while v.slots[i] != EMPTY {
                i = (i + 1) & (SLOTS - 1);
            }
            v.slots[i] = tag | rank;
        }
        v
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The bytes of token `rank` (< len()).
    pub(super) fn token(&self, rank: Rank) -> &'static [u8] {
        let bytes: &'static [u8] = self.bytes;
        &bytes[self.offsets[rank as usize] as usize..self.offsets[rank as usize + 1] as usize]
    }

    /// The rank of the token `piece`, or NONE.
    #[inline]
    pub(super) fn rank(&self, piece: &[u8]) -> Rank {
        let (mut i, tag) = slot_and_tag(hash(piece));
        loop {
            let slot = self.slots[i];
            if slot == EMPTY {
                return NONE;
            }
            if slot & !RANK_MASK == tag && self.token(slot & RANK_MASK) == piece {
                return slot & RANK_MASK;
            }
            i = (i + 1) & (SLOTS - 1);
        }
    }

    /// Probe lengths of a successful lookup of every token: (mean, max). For the tests.
    #[cfg(test)]
    pub(super) fn probes(&self) -> (f64, usize) {
        let (mut sum, mut max) = (0, 0);
        for rank in 0..self.len() as Rank {
            let (mut i, _) = slot_and_tag(hash(self.token(rank)));
            let mut probes = 1;
            while self.slots[i] & RANK_MASK != rank {
                i = (i + 1) & (SLOTS - 1);
                probes += 1;
            }
            sum += probes;
            max = max.max(probes);
        }
        (sum as f64 / self.len() as f64, max)
    }

    /// Calls `emit` with the bytes of each token of `encode_ordinary(text)`, in order.
    #[inline]
    pub(super) fn each_token(&self, text: &str, mut emit: impl FnMut(&[u8])) {
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let end = piece_end(b, i);
            self.piece(&b[i..end], &mut emit);
            i = end;
        }
    }

    /// Tokens of `encode_ordinary(text)`.
    pub(super) fn count(&self, text: &str) -> usize {
        let mut n = 0;
        self.each_token(text, |_| n += 1);
        n
    }

    /// Bytes of `text` that its first `n` tokens cover.
    pub(super) fn prefix_len(&self, text: &str, n: usize) -> usize {
        let (mut tokens, mut len) = (0, 0);
        self.each_token(text, |token| {
            if tokens < n {
                tokens += 1;
                len += token.len();
            }
        });
        len
    }

    /// The tokens of one piece: those of each of its chunks when it is longer than [`CHUNK`].
    #[inline]
    fn piece(&self, piece: &[u8], emit: &mut impl FnMut(&[u8])) {
        if piece.len() <= CHUNK {
            return self.whole(piece, emit);
        }
        let mut rest = piece;
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(chunk_len(rest));
            self.whole(chunk, emit);
            rest = after;
        }
    }

    /// The tokens of a piece merged whole: itself if it is one, else its byte-pair merge.
    #[inline]
    fn whole(&self, piece: &[u8], emit: &mut impl FnMut(&[u8])) {
        if piece.len() == 1 || (piece.len() <= self.longest && self.rank(piece) != NONE) {
            emit(piece)
        } else if piece.len() < SMALL {
            self.merge_small(piece, emit)
        } else {
            self.merge_large(piece, emit)
        }
    }

    /// tiktoken's `_byte_pair_merge`: repeatedly merge the adjacent pair of parts whose
    /// concatenation has the lowest rank (the leftmost of equals). Part k starts at `start[k]`;
    /// `rank[k]` is the rank of parts k and k + 1 together.
    pub(super) fn merge_small(&self, piece: &[u8], emit: &mut impl FnMut(&[u8])) {
        let n = piece.len();
        debug_assert!((2..SMALL).contains(&n));
        let mut start = [0u8; SMALL + 1];
        let mut rank = [NONE; SMALL + 1];
        for k in 0..n - 1 {
            start[k] = k as u8;
            rank[k] = self.rank(&piece[k..k + 2]);
        }
        start[n - 1] = (n - 1) as u8;
        start[n] = n as u8;
        let mut len = n + 1;
        loop {
            let (mut min, mut at) = (NONE, 0);
            for (k, &r) in rank[..len - 1].iter().enumerate() {
                if r < min {
                    min = r;
                    at = k;
                }
            }
            if min == NONE {
                break;
            }
            // Parts at and at + 1 merge: recompute the pairs that now end or start at `at`
            // (part at + 1 is still in the arrays, so the part after the merged one is at + 2).
            if at > 0 {
                rank[at - 1] =
                    if at + 2 < len { self.rank(part(piece, &start, at - 1, at + 2)) } else { NONE };
            }
            rank[at] = if at + 3 < len { self.rank(part(piece, &start, at, at + 3)) } else { NONE };
            start.copy_within(at + 2..len, at + 1);
            rank.copy_within(at + 2..len, at + 1);
            len -= 1;
        }
        for k in 0..len - 1 {
            emit(part(piece, &start, k, k + 1));
        }
    }

    /// tiktoken's `_byte_pair_merge_large`: the same merges, found with a binary heap of
    /// candidate (rank, start) pairs over a linked list of parts; stale candidates are skipped.
    pub(super) fn merge_large(&self, piece: &[u8], emit: &mut impl FnMut(&[u8])) {
        struct Part {
            prev: usize,
            end: usize,
            next_end: usize,
            next_rank: Rank,
        }
        let n = piece.len();
        #[cfg(test)]
        WIDEST_MERGE.with(|w| w.set(w.get().max(n)));
        let mut parts: Vec<Part> = (0..n)
            .map(|i| Part { prev: i.wrapping_sub(1), end: i + 1, next_end: i + 2, next_rank: NONE })
            .collect();
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.rank(&piece[i..i + 2]);
            if r != NONE {
                heap.push(Reverse((r, i)));
                parts[i].next_rank = r;
            }
        }
        let candidate = |parts: &mut [Part],
                         heap: &mut BinaryHeap<Reverse<(Rank, usize)>>,
                         start: usize,
                         next_end: usize| {
            parts[start].next_end = next_end;
            parts[start].next_rank = NONE;
            if next_end <= n {
                let r = self.rank(&piece[start..next_end]);
                if r != NONE {
                    heap.push(Reverse((r, start)));
                    parts[start].next_rank = r;
                }
            }
        };
        while let Some(Reverse((r, left))) = heap.pop() {
            if r != parts[left].next_rank {
                continue;
            }
            let right = parts[left].end;
            let right_end = parts[left].next_end;
            let right_next_end = parts[right].next_end;
            parts[left].end = right_end;
            candidate(&mut parts, &mut heap, left, right_next_end);
            if right_end < n {
                parts[right_end].prev = left;
            }
            if left > 0 {
                let prev = parts[left].prev;
                candidate(&mut parts, &mut heap, prev, right_end);
            }
            parts[right].next_rank = NONE;
        }
        let mut i = 0;
        while i < n {
            emit(&piece[i..parts[i].end]);
            i = parts[i].end;
        }
    }
}

/// The length of the first chunk of `piece`: [`CHUNK`] bytes (all of it if it is shorter), cut
/// back to the start of a character. Pieces are whole UTF-8 text, so a chunk is never empty.
fn chunk_len(piece: &[u8]) -> usize {
    if piece.len() <= CHUNK {
        return piece.len();
    }
    let mut end = CHUNK;
    while piece[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    end
}

#[cfg(test)]
thread_local! {
    /// The longest piece (or chunk) [`Vocabulary::merge_large`] has merged on this thread.
    pub(super) static WIDEST_MERGE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Parts a to b (exclusive) of a piece being merged.
fn part<'a>(piece: &'a [u8], start: &[u8], a: usize, b: usize) -> &'a [u8] {
    &piece[start[a] as usize..start[b] as usize]
}

/// What the pattern distinguishes of a character.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Class {
    /// `[^\s\p{L}\p{N}]`
    Other,
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\s` but not `[\r\n]`
    Space,
    /// `[\r\n]`
    Newline,
    /// Past the end of the text.
    End,
}

const fn ascii_classes() -> [Class; 128] {
    let mut t = [Class::Other; 128];
    let mut c = 0;
    while c < 128 {
        t[c] = match c as u8 {
            b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
            b'0'..=b'9' => Class::Number,
            b'\r' | b'\n' => Class::Newline,
            b'\t' | 0x0b | 0x0c | b' ' => Class::Space,
            _ => Class::Other,
        };
        c += 1;
    }
    t
}

static ASCII: [Class; 128] = ascii_classes();

/// The class of a code point.
pub(super) fn class_of(c: u32) -> Class {
    if c < 0x80 {
        return ASCII[c as usize];
    }
    let i = NON_ASCII.partition_point(|&(_, last, _)| last < c);
    match NON_ASCII.get(i) {
        Some(&(first, _, class)) if first <= c => class,
        _ => Class::Other,
    }
}

/// The class and UTF-8 length of the character at `b[i]` (End past the end).
#[inline(always)]
fn class_at(b: &[u8], i: usize) -> (Class, usize) {
    match b.get(i) {
        Some(&b0) if b0 < 0x80 => (ASCII[b0 as usize], 1),
        Some(&b0) => non_ascii_class_at(b, i, b0),
        None => (Class::End, 0),
    }
}

#[inline(never)]
fn non_ascii_class_at(b: &[u8], i: usize, b0: u8) -> (Class, usize) {
    let cont = |k: usize| (b[i + k] & 0x3f) as u32;
    let (c, len) = match b0 {
        0xc0..=0xdf => (((b0 & 0x1f) as u32) << 6 | cont(1), 2),
        0xe0..=0xef => (((b0 & 0x0f) as u32) << 12 | cont(1) << 6 | cont(2), 3),
        _ => (((b0 & 0x07) as u32) << 18 | cont(1) << 12 | cont(2) << 6 | cont(3), 4),
    };
    (class_of(c), len)
}

/// End of a run of `class` from `i`.
#[inline]
fn run_end(b: &[u8], mut i: usize, class: Class) -> usize {
    loop {
        let (c, len) = class_at(b, i);
        if c != class {
            return i;
        }
        i += len;
    }
}

/// `[^\s\p{L}\p{N}]++[\r\n]*+` from `i`, the first character being Other.
fn punctuation_end(b: &[u8], i: usize) -> usize {
    let mut i = run_end(b, i, Class::Other);
    while matches!(b.get(i), Some(b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// `'(?i:[sdmt]|ll|ve|re)` after the apostrophe: the length matched. Case folding is Unicode's
/// simple folding, under which ſ (U+017F) is an s.
fn contraction(rest: &[u8]) -> Option<usize> {
    match rest {
        [b's' | b'S' | b'd' | b'D' | b'm' | b'M' | b't' | b'T', ..] => Some(1),
        [0xc5, 0xbf, ..] => Some(2),
        [b'l' | b'L', b'l' | b'L', ..] | [b'v' | b'V' | b'r' | b'R', b'e' | b'E', ..] => Some(2),
        _ => None,
    }
}

/// The end of the piece that starts at `b[i]` (i < b.len()): the first alternative of the
/// pattern that matches there, as the regex engine would choose it.
pub(super) fn piece_end(b: &[u8], i: usize) -> usize {
    let (class, len) = class_at(b, i);
    match class {
        // [^\r\n\p{L}\p{N}]?+\p{L}++ without the prefix
        Class::Letter => return run_end(b, i + len, Class::Letter),
        // \p{N}{1,3}+
        Class::Number => {
            let mut end = i + len;
            for _ in 0..2 {
                match class_at(b, end) {
                    (Class::Number, len) => end += len,
                    _ => break,
                }
            }
            return end;
        }
        _ => {}
    }
    if b[i] == b'\'' {
        if let Some(len) = contraction(&b[i + 1..]) {
            return i + 1 + len;
        }
    }
    let (next, next_len) = class_at(b, i + len);
    // [^\r\n\p{L}\p{N}]?+\p{L}++ with the prefix
    if next == Class::Letter && class != Class::Newline {
        return run_end(b, i + len + next_len, Class::Letter);
    }
    // ` ?[^\s\p{L}\p{N}]++[\r\n]*+`
    if class == Class::Other {
        return punctuation_end(b, i);
    }
    if b[i] == b' ' && next == Class::Other {
        return punctuation_end(b, i + 1);
    }
    // Whitespace: \s++$|\s*[\r\n]|\s+(?!\S)|\s
    let (mut end, mut last, mut newline_end, mut count) = (i, i, None, 0);
    loop {
        match class_at(b, end) {
            (Class::End, _) => return end,
            (Class::Space, len) => {
                last = end;
                end += len;
            }
            (Class::Newline, len) => {
                last = end;
                end += len;
                newline_end = Some(end);
            }
            _ => break,
        }
        count += 1;
    }
    match newline_end {
        Some(end) => end,
        None if count >= 2 => last,
        None => end,
    }
}
