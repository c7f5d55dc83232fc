/* SentencePiece BPE over a GGUF "llama" vocabulary: encode and decode, exactly as the HF
 * `tokenizers` pipeline lmlab builds from the same file (lmlab/tokenizer.py, _sentencepiece_bpe).
 *
 * The vocabulary is one UTF-8 blob with offsets, an open-addressing hash of spelling -> id and
 * one flag byte per piece: about 6 MB for Gemma 3's 262k pieces, where the `tokenizers` object
 * with its 515k derived merges holds ~70 MB.
 *
 * encode(text):
 *   1. added tokens (control and user-defined pieces) are cut out of the raw text first,
 *      leftmost-longest, as `tokenizers` does for AddedToken(normalized=False);
 *   2. in each piece of text between them ' ' becomes U+2581 ("▁"), and, for files that ask for
 *      a prefix space, "▁" is put in front of the text's first piece (Metaspace, "first");
 *   3. each character is a symbol: its piece, else its bytes' <0xXX> pieces, else unk (fused);
 *   4. BPE: repeatedly join the adjacent pair whose concatenation is a piece and ranks best, the
 *      rank of `lmlab.spm.merges_from_vocab`: the piece's score (high first), then the longer left part,
 *      then the longer right part (both in characters), then the piece's vocabulary order;
 *      equal ranks: leftmost. Symbols are a linked list, candidate pairs a binary heap.
 * decode(ids): pieces with "▁" -> ' ', runs of <0xXX> pieces -> their bytes (one U+FFFD per
 *   byte when the run is not valid UTF-8), and one leading ' ' stripped when a prefix space was
 *   added.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ADDED 1   /* an added token: matched in the raw text before BPE */
#define SPECIAL 2 /* a control token: dropped by decode(skip_special=1) */

static const char META[3] = {'\xe2', '\x96', '\x81'}; /* U+2581, the SentencePiece space */

typedef struct {
    int32_t n_pieces;
    int32_t n_distinct;   /* distinct spellings: what the vocabulary dict holds */
    char *blob;           /* (offsets[n_pieces]) every piece's UTF-8 bytes, one after another */
    uint32_t *offsets;    /* (n_pieces + 1) piece i is blob[offsets[i] .. offsets[i + 1]) */
    float *scores;        /* (n_pieces) or NULL: score of piece i is -i (Gemma: vocabulary order) */
    int32_t *first_id;    /* (n_pieces) or NULL when no spelling repeats: first id of a spelling */
    int32_t *table;       /* (table_mask + 1) canonical id (last of its spelling) per slot, -1 empty */
    uint64_t table_mask;
    uint8_t *flags;       /* (n_pieces) ADDED | SPECIAL */
    int32_t byte_id[256]; /* id of "<0xXX>", -1 where the vocabulary has none */
    int32_t unk_id;       /* -1: a character with no piece and no byte pieces is dropped */
    int32_t prefix_space; /* prepend "▁" to the text's first piece; strip one ' ' in decode */
    int32_t added_max_len[256]; /* by first byte: longest added token starting with it, 0: none */
    uint8_t *added_len;   /* (added_max + 1) 1 where some added token has that many bytes */
    int32_t added_max;
} spm_vocab;

typedef struct {
    int32_t id;   /* -1 once merged into the symbol on its left */
    int32_t prev; /* -1: first */
    int32_t next; /* -1: last */
} spm_symbol;

typedef struct {
    double score;    /* score of the joined piece */
    int32_t lchars;  /* characters in the left part */
    int32_t rchars;  /* characters in the right part */
    int32_t order;   /* vocabulary order of the joined piece (first id of its spelling) */
    int32_t left;    /* symbol index of the left part: ties go to the leftmost */
    int32_t right;   /* symbol index of the right part */
    int32_t id;      /* the joined piece */
    uint32_t bytes;  /* bytes of both parts' spellings: a stale entry no longer adds up */
} spm_pair;

/* ---------------------------------------------------------------------------- hashing */

static inline uint64_t fnv_add(uint64_t h, const char *s, int64_t n) {
    for (int64_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    return h;
}

static inline uint64_t mix(uint64_t h) {
    h ^= h >> 32;
    h *= 0x9e3779b97f4a7c15ull;
    return h ^ (h >> 29);
}

#define FNV_START 0xcbf29ce484222325ull

static inline const char *piece(const spm_vocab *v, int32_t id) { return v->blob + v->offsets[id]; }
static inline uint32_t piece_len(const spm_vocab *v, int32_t id) { return v->offsets[id + 1] - v->offsets[id]; }

/* canonical id of the spelling a ++ b (b may be empty), or -1 */
static int32_t lookup2(const spm_vocab *v, uint64_t hash, const char *a, int64_t na, const char *b, int64_t nb) {
    for (uint64_t slot = mix(hash) & v->table_mask;; slot = (slot + 1) & v->table_mask) {
        int32_t id = v->table[slot];
        if (id < 0) return -1;
        if (piece_len(v, id) == (uint64_t)(na + nb) && memcmp(piece(v, id), a, na) == 0 &&
            memcmp(piece(v, id) + na, b, nb) == 0)
            return id;
    }
}

static int32_t lookup(const spm_vocab *v, const char *s, int64_t n) {
    return lookup2(v, fnv_add(FNV_START, s, n), s, n, s, 0);
}

/* ---------------------------------------------------------------------------- building */

void spm_free(spm_vocab *v) {
    if (!v) return;
    free(v->blob);
    free(v->offsets);
    free(v->scores);
    free(v->first_id);
    free(v->table);
    free(v->flags);
    free(v->added_len);
    free(v);
}

/* A vocabulary of n pieces (copied). scores: NULL for -id. NULL on failure. */
spm_vocab *spm_new(int32_t n, const char *blob, const uint32_t *offsets, const float *scores, int32_t prefix_space) {
    spm_vocab *v = calloc(1, sizeof(spm_vocab));
    if (!v || n <= 0) goto fail;
    v->n_pieces = n;
    v->prefix_space = prefix_space;
    uint64_t size = 16;
    while (size < 2 * (uint64_t)n) size *= 2; /* load factor <= 1/2 */
    v->table_mask = size - 1;
    v->blob = malloc(offsets[n] ? offsets[n] : 1);
    v->offsets = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    v->table = malloc(sizeof(int32_t) * size);
    v->flags = calloc((size_t)n, 1);
    if (!v->blob || !v->offsets || !v->table || !v->flags) goto fail;
    memcpy(v->blob, blob, offsets[n]);
    memcpy(v->offsets, offsets, sizeof(uint32_t) * ((size_t)n + 1));
    if (scores) {
        if (!(v->scores = malloc(sizeof(float) * (size_t)n))) goto fail;
        memcpy(v->scores, scores, sizeof(float) * (size_t)n);
    }
    memset(v->table, 0xff, sizeof(int32_t) * size);
    for (int32_t id = 0; id < n; id++) {
        const char *s = piece(v, id);
        uint32_t len = piece_len(v, id);
        uint64_t slot = mix(fnv_add(FNV_START, s, len)) & v->table_mask;
        for (;; slot = (slot + 1) & v->table_mask) {
            int32_t old = v->table[slot];
            if (old < 0) {
                v->table[slot] = id;
                v->n_distinct++;
                break;
            }
            if (piece_len(v, old) == len && memcmp(piece(v, old), s, len) == 0) {
                /* a repeated spelling: the dict keeps the last id, the merge order the first */
                if (!v->first_id) {
                    if (!(v->first_id = malloc(sizeof(int32_t) * (size_t)n))) goto fail;
                    for (int32_t i = 0; i < n; i++) v->first_id[i] = i;
                }
                v->first_id[id] = v->first_id[old];
                v->table[slot] = id;
                break;
            }
        }
    }
    for (int b = 0; b < 256; b++) {
        static const char hex[] = "0123456789ABCDEF";
        char name[6] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
        v->byte_id[b] = lookup(v, name, 6);
    }
    v->unk_id = -1;
    return v;
fail:
    spm_free(v);
    return NULL;
}

/* Mark n pieces as added tokens (special: control tokens). 0 on success. */
int32_t spm_set_added(spm_vocab *v, const int32_t *ids, const uint8_t *special, int32_t n) {
    int32_t max = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= v->n_pieces || piece_len(v, id) == 0) continue;
        v->flags[id] |= ADDED | (special[i] ? SPECIAL : 0); /* special once added as special */
        int32_t len = (int32_t)piece_len(v, id);
        uint8_t first = (uint8_t)piece(v, id)[0];
        if (len > v->added_max_len[first]) v->added_max_len[first] = len;
        if (len > max) max = len;
    }
    free(v->added_len);
    if (!(v->added_len = calloc((size_t)max + 1, 1))) return -1;
    v->added_max = max;
    for (int32_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < v->n_pieces && (v->flags[ids[i]] & ADDED)) v->added_len[piece_len(v, ids[i])] = 1;
    return 0;
}

int32_t spm_n_distinct(const spm_vocab *v) { return v->n_distinct; }

/* canonical id of a spelling, -1 if none */
int32_t spm_piece_id(const spm_vocab *v, const char *s, int64_t n) { return lookup(v, s, n); }

/* the spelling of id, or NULL where the vocabulary dict has no such id (out of range, or an earlier
 * duplicate of a spelling) */
const char *spm_piece(const spm_vocab *v, int32_t id, int64_t *len) {
    if (id < 0 || id >= v->n_pieces) return NULL;
    if (v->first_id && lookup(v, piece(v, id), piece_len(v, id)) != id) return NULL;
    *len = piece_len(v, id);
    return piece(v, id);
}

int32_t spm_flags(const spm_vocab *v, int32_t id) { return id >= 0 && id < v->n_pieces ? v->flags[id] : 0; }

/* the spelling of piece id (0 <= id < n_pieces), duplicates included */
const char *spm_piece_at(const spm_vocab *v, int32_t id, int64_t *len) {
    *len = piece_len(v, id);
    return piece(v, id);
}

/* the scores given to spm_new, NULL if none */
const float *spm_scores(const spm_vocab *v) { return v->scores; }

/* the unknown piece (an id from spm_piece_id), -1 for none */
void spm_set_unk(spm_vocab *v, int32_t id) { v->unk_id = id >= 0 && id < v->n_pieces ? id : -1; }

/* ---------------------------------------------------------------------------- encoding */

static inline int32_t utf8_len(uint8_t lead) {
    return lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
}

static inline int32_t n_chars(const char *s, uint32_t n) {
    int32_t c = 0;
    for (uint32_t i = 0; i < n; i++) c += ((uint8_t)s[i] & 0xc0) != 0x80;
    return c;
}

/* bytes of the longest added token at text[0..], 0 if none; its id in *id */
static int64_t match_added(const spm_vocab *v, const char *text, int64_t n, int32_t *id) {
    int64_t max = v->added_max_len[(uint8_t)text[0]], best = 0;
    if (max > n) max = n;
    uint64_t h = FNV_START;
    for (int64_t len = 1; len <= max; len++) {
        h = (h ^ (uint8_t)text[len - 1]) * 0x100000001b3ull;
        if (!v->added_len[len]) continue;
        int32_t c = lookup2(v, h, text, len, text, 0);
        if (c >= 0 && (v->flags[c] & ADDED)) {
            best = len;
            *id = c;
        }
    }
    return best;
}

typedef struct {
    spm_symbol *sym;
    int32_t n_sym;
    spm_pair *heap;
    int64_t n_heap, cap_heap;
} spm_work;

static inline int better(const spm_pair *a, const spm_pair *b) {
    if (a->score != b->score) return a->score > b->score;
    if (a->lchars != b->lchars) return a->lchars > b->lchars;
    if (a->rchars != b->rchars) return a->rchars > b->rchars;
    if (a->order != b->order) return a->order < b->order;
    return a->left < b->left;
}

static int heap_push(spm_work *w, spm_pair p) {
    if (w->n_heap == w->cap_heap) {
        int64_t cap = w->cap_heap * 2 + 64;
        spm_pair *h = realloc(w->heap, sizeof(spm_pair) * (size_t)cap);
        if (!h) return -1;
        w->heap = h;
        w->cap_heap = cap;
    }
    int64_t i = w->n_heap++;
    while (i > 0 && better(&p, &w->heap[(i - 1) / 2])) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = p;
    return 0;
}

static spm_pair heap_pop(spm_work *w) {
    spm_pair top = w->heap[0], last = w->heap[--w->n_heap];
    int64_t i = 0, n = w->n_heap;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && better(&w->heap[c + 1], &w->heap[c])) c++;
        if (!better(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

/* queue the pair (left, its next symbol) if their spellings join into a piece */
static int try_pair(const spm_vocab *v, spm_work *w, int32_t left) {
    if (left < 0) return 0;
    int32_t right = w->sym[left].next;
    if (right < 0) return 0;
    int32_t a = w->sym[left].id, b = w->sym[right].id;
    uint32_t na = piece_len(v, a), nb = piece_len(v, b);
    uint64_t h = fnv_add(fnv_add(FNV_START, piece(v, a), na), piece(v, b), nb);
    int32_t t = lookup2(v, h, piece(v, a), na, piece(v, b), nb);
    if (t < 0) return 0;
    spm_pair p = {
        .score = v->scores ? (double)v->scores[t] : -(double)t,
        .lchars = n_chars(piece(v, a), na),
        .rchars = n_chars(piece(v, b), nb),
        .order = v->first_id ? v->first_id[t] : t,
        .left = left,
        .right = right,
        .id = t,
        .bytes = na + nb,
    };
    return heap_push(w, p);
}

static inline void add_symbol(spm_work *w, int32_t id) {
    int32_t i = w->n_sym++;
    w->sym[i] = (spm_symbol){id, i - 1, -1};
    if (i > 0) w->sym[i - 1].next = i;
}

/* One piece of text between added tokens -> ids appended to out. at_start: it begins the text. */
static int64_t encode_piece(const spm_vocab *v, spm_work *w, const char *text, int64_t n, int at_start, int32_t *out) {
    w->n_sym = 0;
    w->n_heap = 0;
    int32_t unk_pending = 0; /* consecutive unknown characters fuse into one unk (tokenizers: fuse_unk) */
    int prepend = v->prefix_space && at_start && text[0] != ' ' && !(n >= 3 && memcmp(text, META, 3) == 0);
    for (int64_t i = prepend ? -1 : 0; i < n;) {
        const char *c; /* this character's spelling: ' ' is spelled "▁", the prepended one too */
        int64_t len, step;
        if (i < 0 || text[i] == ' ') {
            c = META, len = 3, step = 1;
        } else {
            c = text + i, len = step = utf8_len((uint8_t)text[i]);
            if (len > n - i) len = step = n - i;
        }
        int32_t id = lookup(v, c, len);
        if (id >= 0) {
            if (unk_pending) add_symbol(w, v->unk_id), unk_pending = 0;
            add_symbol(w, id);
        } else {
            int all = 1; /* byte fallback: every byte of the character must have its piece */
            for (int64_t k = 0; k < len; k++) all &= v->byte_id[(uint8_t)c[k]] >= 0;
            if (all)
                for (int64_t k = 0; k < len; k++) add_symbol(w, v->byte_id[(uint8_t)c[k]]);
            else if (v->unk_id >= 0)
                unk_pending = 1;
        }
        i += step;
    }
    if (unk_pending) add_symbol(w, v->unk_id);

    for (int32_t i = 0; i + 1 < w->n_sym; i++)
        if (try_pair(v, w, i)) return -1;
    while (w->n_heap) {
        spm_pair p = heap_pop(w);
        spm_symbol *l = &w->sym[p.left];
        if (l->id < 0 || l->next != p.right || piece_len(v, l->id) + piece_len(v, w->sym[p.right].id) != p.bytes)
            continue; /* one side was merged since: stale */
        spm_symbol *r = &w->sym[p.right];
        l->id = p.id;
        l->next = r->next;
        if (r->next >= 0) w->sym[r->next].prev = p.left;
        r->id = -1;
        if (try_pair(v, w, l->prev) || try_pair(v, w, p.left)) return -1;
    }
    int64_t k = 0;
    for (int32_t i = w->n_sym ? 0 : -1; i >= 0; i = w->sym[i].next) out[k++] = w->sym[i].id;
    return k;
}

/* Token ids of UTF-8 text into out, which holds 3 * (n + 1) ids: the most there can be, when each
 * ' ' and the prepended "▁" fall back to the 3 byte pieces of "▁". Returns the count, -1 when out
 * of memory, -2 when the text is too long for int32 symbol links (over ~700 MB). */
int64_t spm_encode(const spm_vocab *v, const char *text, int64_t n, int32_t *out) {
    if (n >= INT32_MAX / 3 - 1) return -2;
    spm_work w = {0};
    w.sym = malloc(sizeof(spm_symbol) * 3 * ((size_t)n + 1));
    if (!w.sym) return -1;
    int64_t k = 0, start = 0, got;
    for (int64_t i = 0; i < n;) {
        int32_t id;
        int64_t m = v->added_max_len[(uint8_t)text[i]] ? match_added(v, text + i, n - i, &id) : 0;
        if (!m) {
            i++;
            continue;
        }
        if (i > start) {
            if ((got = encode_piece(v, &w, text + start, i - start, start == 0, out + k)) < 0) goto oom;
            k += got;
        }
        out[k++] = id;
        i += m;
        start = i;
    }
    if (n > start) {
        if ((got = encode_piece(v, &w, text + start, n - start, start == 0, out + k)) < 0) goto oom;
        k += got;
    }
    free(w.sym);
    free(w.heap);
    return k;
oom:
    free(w.sym);
    free(w.heap);
    return -1;
}

/* ---------------------------------------------------------------------------- decoding */

static inline int hexval(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* "<0xXX>" -> the byte, else -1 (the ByteFallback decoder's test: 6 bytes, "<0x", ">", a u8 in hex) */
static int byte_piece(const char *s, uint32_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int hi = hexval(s[3]), lo = hexval(s[4]);
    if (s[3] == '+' && lo >= 0) return lo; /* Rust's from_str_radix takes a leading '+' */
    return hi >= 0 && lo >= 0 ? hi * 16 + lo : -1;
}

/* length of the valid UTF-8 sequence at s[0..n), 0 if invalid (Rust's str::from_utf8 rules) */
static int64_t valid_utf8(const uint8_t *s, int64_t n) {
    for (int64_t i = 0; i < n;) {
        uint8_t c = s[i];
        int len = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (!len || i + len > n) return 0;
        uint8_t lo = 0x80, hi = 0xbf;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
        if (len > 1 && (s[i + 1] < lo || s[i + 1] > hi)) return 0;
        for (int k = 2; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80) return 0;
        i += len;
    }
    return 1;
}

typedef struct {
    char *out;
    int64_t cap, n;
} spm_text;

static inline void put(spm_text *t, const char *s, int64_t n) {
    if (t->n + n <= t->cap) memcpy(t->out + t->n, s, n);
    t->n += n;
}

static void flush_bytes(spm_text *t, const uint8_t *bytes, int64_t n) {
    if (valid_utf8(bytes, n)) {
        put(t, (const char *)bytes, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) put(t, "\xef\xbf\xbd", 3); /* U+FFFD per byte of the run */
}

/* Text of n ids into out (cap bytes). Returns the bytes the text needs: when that is more than cap
 * (it may count one ' ' that is stripped once it fits), out holds only a prefix; call again with a
 * larger buffer. -1: out of memory. */
int64_t spm_decode(const spm_vocab *v, const int32_t *ids, int64_t n, int32_t skip_special, char *out, int64_t cap) {
    spm_text t = {out, cap, 0};
    uint8_t *bytes = malloc((size_t)n + 1);
    if (!bytes) return -1;
    int64_t n_bytes = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        int64_t len;
        const char *s = spm_piece(v, id, &len);
        if (!s || (skip_special && (v->flags[id] & SPECIAL))) continue; /* dropped before the decoders */
        int b = byte_piece(s, (uint32_t)len);
        if (b >= 0) {
            bytes[n_bytes++] = (uint8_t)b;
            continue;
        }
        if (n_bytes) flush_bytes(&t, bytes, n_bytes), n_bytes = 0;
        for (int64_t k = 0; k < len;) { /* "▁" -> ' ' */
            if (k + 3 <= len && memcmp(s + k, META, 3) == 0) {
                put(&t, " ", 1);
                k += 3;
            } else {
                put(&t, s + k, 1);
                k++;
            }
        }
    }
    if (n_bytes) flush_bytes(&t, bytes, n_bytes);
    free(bytes);
    if (v->prefix_space && t.n > 0 && t.n <= t.cap && out[0] == ' ') { /* decoders.Strip(" ", left=1) */
        memmove(out, out + 1, (size_t)t.n - 1);
        t.n--;
    }
    return t.n;
}
