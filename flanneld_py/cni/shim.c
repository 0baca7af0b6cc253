/*
 * flannel-py: the CNI plugin a container runtime executes for every pod, compiled.
 *
 * The same shim as flanneld_py/cni/shim.py, without an interpreter to start: the
 * kubelet waits on it for every pod, and Python's own start-up (~8 ms here) is
 * as long as the whole ADD of the reference Go plugins. It answers VERSION
 * itself and hands every other command to flanneld-py over its unix socket
 * (config key "daemonSocket", default /run/flannel/cni.sock); the daemon
 * validates the request, does the work and sends back {"exit": N, "output": X},
 * of which X is printed and N is the exit status. With no daemon it answers
 * error 11 (try again later; 50 for STATUS) and the runtime retries.
 *
 * It checks nothing of the request: it sends the command, the CNI_* variables
 * and stdin verbatim (as JSON strings; bytes >= 0x80 pass through) for the
 * daemon to judge. It reads the config only as far as it must: a well-formed
 * UTF-8 JSON object (else it cannot find the daemon: error 6 or 7), its two
 * top-level strings cniVersion and daemonSocket (where the daemon is, and the
 * version of the answers it makes itself), and the daemon's two-key answer.
 * tests/test_cni_shims_agree.py holds it to the Python shim's answers.
 *
 * Built by setup.py into flanneld_py/cni/bin/flannel-py; installed by flanneld-py install-cni.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/flannel/cni.sock"
#define LATEST_VERSION "1.1.0"
#define SUPPORTED "[\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"
#define MAX_INPUT (16u << 20)   /* the daemon refuses requests this large anyway */
#define ANSWER_TIMEOUT_S 120    /* as the Python shim; the kubelet gives up on its own schedule */

enum {
    IO_FAILURE = 5,
    DECODE_FAILURE = 6,
    INVALID_CONFIG = 7,
    TRY_AGAIN_LATER = 11,
    NOT_AVAILABLE = 50,
    BAD_ANSWER = 110,
};

extern char **environ;

/* --- a growable byte buffer ---------------------------------------------------- */

struct buf {
    char *data;
    size_t len, cap;
};

static void die_oom(void) {
    fputs("{\"code\":5,\"msg\":\"flannel-py: out of memory\"}\n", stdout);
    exit(1);
}

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data)
        die_oom();
    b->data = data;
    b->cap = cap;
    b->data[b->len] = '\0';
}

static void buf_put(struct buf *b, const char *s, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void buf_puts(struct buf *b, const char *s) { buf_put(b, s, strlen(s)); }

/* s as a JSON string literal; bytes >= 0x80 pass through (the daemon decodes UTF-8). */
static void buf_put_json_string(struct buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    buf_put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_put(b, esc, 2);
        } else if (c < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            buf_put(b, esc, 6);
        } else {
            buf_put(b, (const char *)&s[i], 1);
        }
    }
    buf_put(b, "\"", 1);
}

/* --- just enough JSON: find top-level members, decode a string, skip a value ------- */

struct cursor {
    const char *p, *end;
};

static void skip_ws(struct cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char ch = p[i];
        v <<= 4;
        if (ch >= '0' && ch <= '9') v |= (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f') v |= (unsigned)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F') v |= (unsigned)(ch - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static void put_utf8(struct buf *b, unsigned cp) {
    char out[4];
    size_t n;
    if (cp < 0x80) { out[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    buf_put(b, out, n);
}

/* A string at c->p (after its opening quote is checked); decoded into out if not NULL. */
static int parse_string(struct cursor *c, struct buf *out) {
    if (c->p >= c->end || *c->p != '"')
        return -1;
    c->p++;
    while (c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p++;
        if (ch == '"')
            return 0;
        if (ch < 0x20)
            return -1;
        if (ch != '\\') {
            if (out) buf_put(out, (const char *)&ch, 1);
            continue;
        }
        if (c->p >= c->end)
            return -1;
        char e = *c->p++;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            if (out) buf_put(out, &decoded[simple - "\"\\/bfnrt"], 1);
        } else if (e == 'u') {
            unsigned cp;
            if (c->end - c->p < 4 || hex4(c->p, &cp))
                return -1;
            c->p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && c->end - c->p >= 6 && c->p[0] == '\\' && c->p[1] == 'u') {
                unsigned low;
                if (!hex4(c->p + 2, &low) && low >= 0xDC00 && low < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    c->p += 6;
                }
            }
            if (out) put_utf8(out, cp);
        } else {
            return -1;
        }
    }
    return -1;
}

static int skip_digits(struct cursor *c) {
    const char *start = c->p;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9')
        c->p++;
    return c->p > start ? 0 : -1;
}

/* -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, as JSON has it */
static int skip_number(struct cursor *c) {
    if (c->p < c->end && *c->p == '-')
        c->p++;
    if (c->p < c->end && *c->p == '0')
        c->p++;
    else if (skip_digits(c))
        return -1;
    if (c->p < c->end && *c->p == '.') {
        c->p++;
        if (skip_digits(c)) return -1;
    }
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        c->p++;
        if (c->p < c->end && (*c->p == '+' || *c->p == '-')) c->p++;
        if (skip_digits(c)) return -1;
    }
    return 0;
}

/* Well-formed UTF-8: no overlong forms, surrogates or code points beyond U+10FFFF. */
static int utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char b = s[i];
        size_t len;
        unsigned cp, min;
        if (b < 0x80) { i++; continue; }
        if ((b & 0xE0) == 0xC0) { len = 2; cp = b & 0x1F; min = 0x80; }
        else if ((b & 0xF0) == 0xE0) { len = 3; cp = b & 0x0F; min = 0x800; }
        else if ((b & 0xF8) == 0xF0) { len = 4; cp = b & 0x07; min = 0x10000; }
        else return 0;
        if (n - i < len) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return 0;
        i += len;
    }
    return 1;
}

/* Skip one value of any kind; -1 on malformed input or nesting beyond 512. */
static int skip_value(struct cursor *c, int depth) {
    skip_ws(c);
    if (c->p >= c->end || depth > 512)
        return -1;
    char ch = *c->p;
    if (ch == '"')
        return parse_string(c, NULL);
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == close) { c->p++; return 0; }
        for (;;) {
            if (ch == '{') {
                skip_ws(c);
                if (parse_string(c, NULL)) return -1;
                skip_ws(c);
                if (c->p >= c->end || *c->p++ != ':') return -1;
            }
            if (skip_value(c, depth + 1)) return -1;
            skip_ws(c);
            if (c->p >= c->end) return -1;
            if (*c->p == ',') { c->p++; continue; }
            if (*c->p == close) { c->p++; return 0; }
            return -1;
        }
    }
    static const char *const literals[] = {"true", "false", "null"};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(literals[i]);
        if ((size_t)(c->end - c->p) >= n && !memcmp(c->p, literals[i], n)) {
            c->p += n;
            return 0;
        }
    }
    return skip_number(c);
}

/* The whole text is one JSON value (UTF-8, strict grammar, surrounding whitespace only). */
static int json_valid(const char *text, size_t n) {
    if (!utf8_valid((const unsigned char *)text, n))
        return 0;
    struct cursor c = {text, text + n};
    if (skip_value(&c, 0))
        return 0;
    skip_ws(&c);
    return c.p == c.end;
}

/*
 * Walk a top-level object; for each member whose key is in keys[], store where its
 * value starts and ends. Returns 0 for a well-formed object, -1 otherwise.
 */
static int object_members(const char *text, size_t n, const char *const keys[], size_t nkeys,
                          const char *starts[], const char *ends[]) {
    struct cursor c = {text, text + n};
    for (size_t i = 0; i < nkeys; i++)
        starts[i] = ends[i] = NULL;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{')
        return -1;
    c.p++;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}')
        return 0;
    struct buf key = {0};
    for (;;) {
        key.len = 0;
        skip_ws(&c);
        if (parse_string(&c, &key)) goto bad;
        skip_ws(&c);
        if (c.p >= c.end || *c.p++ != ':') goto bad;
        skip_ws(&c);
        const char *value = c.p;
        if (skip_value(&c, 1)) goto bad;
        for (size_t i = 0; i < nkeys; i++)
            if (key.data && strlen(keys[i]) == key.len && !memcmp(keys[i], key.data, key.len)) {
                starts[i] = value;  /* the last duplicate wins, as in Python's json */
                ends[i] = c.p;
            }
        skip_ws(&c);
        if (c.p >= c.end) goto bad;
        if (*c.p == ',') { c.p++; continue; }
        if (*c.p == '}') { c.p++; break; }
        goto bad;
    }
    free(key.data);
    skip_ws(&c);
    return c.p == c.end ? 0 : -1;
bad:
    free(key.data);
    return -1;
}

/* The decoded string value between start and end, or NULL when absent or not a string. */
static char *string_value(const char *start, const char *end) {
    if (!start || *start != '"')
        return NULL;
    struct cursor c = {start, end};
    struct buf out = {0};
    buf_reserve(&out, 0);
    if (parse_string(&c, &out)) {
        free(out.data);
        return NULL;
    }
    return out.data;
}

/* --- the plugin ------------------------------------------------------------------ */

static const char *answer_version(const char *requested) {
    static const char *const supported[] = {"0.3.1", "0.4.0", "1.0.0", "1.1.0"};
    for (size_t i = 0; requested && i < sizeof supported / sizeof *supported; i++)
        if (!strcmp(requested, supported[i]))
            return supported[i];
    return LATEST_VERSION;
}

static int fail(const char *version, int code, const char *details, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct buf out = {0};
    buf_puts(&out, "{\"cniVersion\":");
    buf_put_json_string(&out, version, strlen(version));
    char code_text[32];
    snprintf(code_text, sizeof code_text, ",\"code\":%d,\"msg\":", code);
    buf_puts(&out, code_text);
    buf_put_json_string(&out, msg, strlen(msg));
    if (details && *details) {
        buf_puts(&out, ",\"details\":");
        buf_put_json_string(&out, details, strlen(details));
    }
    buf_puts(&out, "}\n");
    fwrite(out.data, 1, out.len, stdout);
    free(out.data);
    return 1;
}

static int read_all(int fd, struct buf *b, size_t limit) {
    for (;;) {
        buf_reserve(b, 65536);
        ssize_t n = read(fd, b->data + b->len, b->cap - b->len - 1);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        b->len += (size_t)n;
        b->data[b->len] = '\0';
        if (b->len > limit) {
            errno = EFBIG;
            return -1;
        }
    }
}

static int send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t sent = send(fd, p, n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += sent;
        n -= (size_t)sent;
    }
    return 0;
}

/* {"command": ..., "env": {CNI_*...}, "config_text": "<stdin>"} */
static void build_request(struct buf *req, const char *command, const struct buf *config) {
    buf_puts(req, "{\"command\":");
    buf_put_json_string(req, command, strlen(command));
    buf_puts(req, ",\"env\":{");
    int first = 1;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "CNI_", 4) || !eq)
            continue;
        if (!first) buf_put(req, ",", 1);
        first = 0;
        buf_put_json_string(req, *e, (size_t)(eq - *e));
        buf_put(req, ":", 1);
        buf_put_json_string(req, eq + 1, strlen(eq + 1));
    }
    buf_puts(req, "},\"config_text\":");
    buf_put_json_string(req, config->data ? config->data : "", config->len);
    buf_put(req, "}", 1);
}

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    struct buf config = {0};
    buf_reserve(&config, 0);
    if (read_all(STDIN_FILENO, &config, MAX_INPUT))
        return fail(LATEST_VERSION, IO_FAILURE, strerror(errno), "cannot read the network config on stdin");

    /* Only what the shim must answer itself: a config it cannot read (so it cannot find the
       daemon), VERSION, and "not running" in the config's cniVersion. Every other check of
       the request is the daemon's (flanneld_py/cni/models.py). */
    if (!command)
        command = "";
    int is_version = !strcmp(command, "VERSION");
    static const char *const keys[] = {"cniVersion", "daemonSocket"};
    const char *starts[2] = {NULL, NULL}, *ends[2] = {NULL, NULL};
    int is_json = json_valid(config.data, config.len);
    int is_object = is_json && object_members(config.data, config.len, keys, 2, starts, ends) == 0;
    if (!is_version && !is_json)
        return fail(LATEST_VERSION, DECODE_FAILURE, "not well-formed UTF-8 JSON",
                    "cannot decode the network config on stdin");
    if (!is_version && !is_object)
        return fail(LATEST_VERSION, INVALID_CONFIG, NULL, "the network config on stdin must be a JSON object");
    char *requested = is_object ? string_value(starts[0], ends[0]) : NULL;
    const char *version = answer_version(requested);
    if (is_version) {  /* whatever came in: a config it cannot read gets our latest version */
        printf("{\"cniVersion\":\"%s\",\"supportedVersions\":" SUPPORTED "}\n", version);
        return 0;
    }
    char *socket_path = string_value(starts[1], ends[1]);
    const char *path = socket_path && *socket_path ? socket_path : DEFAULT_SOCKET;
    int unavailable = !strcmp(command, "STATUS") ? NOT_AVAILABLE : TRY_AGAIN_LATER;

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)  /* what Python's connect() says of it */
        return fail(version, unavailable, "AF_UNIX path too long",
                    "flanneld-py is not running on this node (no answer on %s); the runtime will retry", path);
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail(version, unavailable, strerror(errno),
                    "flanneld-py is not running on this node (no answer on %s); the runtime will retry", path);
    struct timeval timeout = {.tv_sec = ANSWER_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);

    struct buf request = {0};
    build_request(&request, command, &config);
    struct buf answer = {0};
    if (send_all(fd, request.data, request.len) || shutdown(fd, SHUT_WR) || read_all(fd, &answer, MAX_INPUT)) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return fail(version, unavailable, NULL, "flanneld-py did not answer on %s within %d s; the runtime will retry",
                        path, ANSWER_TIMEOUT_S);
        return fail(version, unavailable, strerror(errno), "lost the connection to flanneld-py on %s", path);
    }
    close(fd);

    static const char *const answer_keys[] = {"exit", "output"};
    const char *a_starts[2], *a_ends[2];
    int status = -1;
    if (answer.data && object_members(answer.data, answer.len, answer_keys, 2, a_starts, a_ends) == 0 && a_starts[0]) {
        size_t n = (size_t)(a_ends[0] - a_starts[0]);
        if (n == 1 && (*a_starts[0] == '0' || *a_starts[0] == '1'))
            status = *a_starts[0] - '0';
    }
    if (status < 0)
        return fail(version, BAD_ANSWER, answer.data ? answer.data : "",
                    "flanneld-py sent an answer the plugin cannot read; are the plugin and the daemon the same version?");
    if (a_starts[1] && !(a_ends[1] - a_starts[1] == 4 && !memcmp(a_starts[1], "null", 4))) {
        fwrite(a_starts[1], 1, (size_t)(a_ends[1] - a_starts[1]), stdout);
        fputc('\n', stdout);
    }
    return fflush(stdout) == 0 ? status : 1;
}
