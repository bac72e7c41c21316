/* gRPC bidirectional streams driven through gRPC's C core, for the replication log: the primary's client
   stream (Stream) and the backup's server (Server, whose accept() returns server-side Streams).

   Python's gRPC runs each stream on its own threads (a thread consuming the request iterator, a
   channel-polling thread, a condition per message), which costs a few hundred microseconds of CPU per
   message and its reply on this machine. Here the calling thread does the work itself: `send` starts the
   write and waits for its completion, `recv` starts a read and waits for it, each on a pluck completion
   queue and without the interpreter lock, so the stream's I/O happens in the caller's thread with no hand-off.
   At most one send and one receive are in flight at a time (gRPC's rule for a call): the callers serialize
   their sends (start_send, then send_done before the next) and read from one thread. A write usually
   completes inside start_send itself (the transport writes in the caller's thread when it is idle), so a
   sender rarely waits.

   Both ends speak gRPC's protocol (HTTP/2, TLS with client certificates), so either may be Python's gRPC.
   The server serves one method; a call to any other ends UNIMPLEMENTED.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include <string.h>

typedef struct {
    PyObject_HEAD
    grpc_channel *channel;
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata_array initial_metadata;
    grpc_metadata_array trailing_metadata;
    grpc_status_code status;
    grpc_slice status_details;
    int status_known;
    grpc_byte_buffer *received;
    int recv_pending; /* a read was started and not yet collected */
    int starts_pending; /* start batches (headers) not yet collected: each holds a reference to the call */
    grpc_byte_buffer *sending; /* the message of the write in flight, until its completion is collected */
    /* Server side (made by Server.accept): the call's method and headers, whether the response headers
       went out (with the first message or the status), the close operation started at accept (it
       completes when the call ends, `cancelled` telling whether it ended without a status). */
    int server_side;
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    int headers_sent;
    int cancelled;
    int close_pending;
    int finish_pending;
    int live; /* counted in live_streams */
    /* Tags: the addresses of these bytes name each kind of operation on the pluck queue. */
    char start_tag, send_tag, recv_tag, status_tag, close_tag;
} Stream;

static gpr_timespec deadline_after(double seconds) {
    /* negative: no deadline; so also beyond ~30 years (and NaN), which would overflow the conversion */
    if (seconds < 0 || !(seconds < 1e9)) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
}

/* How many streams of this process are live (opened or accepted, not yet seen to end): each has a thread
   that waits in its queue for the next message most of the time. gRPC's poller (epoll1) watches every
   socket of the process for whichever thread waits, and with two or more waiting it hands the polling
   from one to another at every event: a wake-up of a second thread per message. So a server's accepting
   thread polls only while no stream is live (Server_accept), and each socket's events are handled by the
   thread that waits for them. Changed under the GIL; read without it (atomically) by accept(). */
static int live_streams;

static void set_live(Stream *self, int live) {
    if (live != self->live) __atomic_add_fetch(&live_streams, live ? 1 : -1, __ATOMIC_RELAXED);
    self->live = live;
}

/* Every completion collected, then the queue destroyed (pluck queues only). */
static void drain_and_destroy(grpc_completion_queue *cq) {
    grpc_completion_queue_shutdown(cq);
    grpc_event ev;
    do {
        ev = grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    } while (ev.type != GRPC_QUEUE_SHUTDOWN);
    grpc_completion_queue_destroy(cq);
}

/* Waits (without the GIL) for the operation named by `tag`; 1 ok, 0 failed, -1 timed out. */
static int wait_for(Stream *self, void *tag, double timeout) {
    grpc_event ev;
    Py_BEGIN_ALLOW_THREADS
    ev = grpc_completion_queue_pluck(self->cq, tag, deadline_after(timeout), NULL);
    Py_END_ALLOW_THREADS
    if (ev.type == GRPC_QUEUE_TIMEOUT) return -1;
    return ev.type == GRPC_OP_COMPLETE && ev.success ? 1 : 0;
}

static int start(Stream *self, const grpc_op *ops, size_t n, void *tag) {
    grpc_call_error err;
    Py_BEGIN_ALLOW_THREADS
    err = grpc_call_start_batch(self->call, ops, n, tag, NULL);
    Py_END_ALLOW_THREADS
    if (err != GRPC_CALL_OK) {
        PyErr_Format(PyExc_RuntimeError, "grpc_call_start_batch refused an operation (error %d)", (int)err);
        return -1;
    }
    return 0;
}

static int Stream_init(Stream *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"target", "method", "root_pem", "key_pem", "cert_pem", "name_override",
                             "timeout", NULL};
    const char *target, *method, *root = NULL, *key = NULL, *cert = NULL, *override = NULL;
    double timeout = 5.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ss|zzzzd", kwlist, &target, &method, &root, &key, &cert,
                                     &override, &timeout))
        return -1;
    if (self->call != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a stream is opened once");
        return -1;
    }
    grpc_channel_credentials *creds;
    if (root != NULL) {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_credentials_create(root, key != NULL ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_arg arg;
    grpc_channel_args channel_args = {0, NULL};
    if (override != NULL) {
        arg.type = GRPC_ARG_STRING;
        arg.key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        arg.value.string = (char *)override;
        channel_args.num_args = 1;
        channel_args.args = &arg;
    }
    self->channel = grpc_channel_create(target, creds, &channel_args);
    grpc_channel_credentials_release(creds);
    self->cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice method_slice = grpc_slice_from_copied_string(method);
    self->call = grpc_channel_create_call(self->channel, NULL, GRPC_PROPAGATE_DEFAULTS, self->cq, method_slice,
                                          NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_slice_unref(method_slice);
    grpc_metadata_array_init(&self->initial_metadata);
    grpc_metadata_array_init(&self->trailing_metadata);
    self->status_details = grpc_empty_slice();

    /* The status operation is started at once: it completes when the call ends, however it ends. */
    grpc_op status_op;
    memset(&status_op, 0, sizeof status_op);
    status_op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    status_op.data.recv_status_on_client.trailing_metadata = &self->trailing_metadata;
    status_op.data.recv_status_on_client.status = &self->status;
    status_op.data.recv_status_on_client.status_details = &self->status_details;
    if (start(self, &status_op, 1, &self->status_tag) < 0) return -1;

    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[1].data.recv_initial_metadata.recv_initial_metadata = &self->initial_metadata;
    /* Only the headers are sent here; the server's come with its first message, so they are waited for
       together with it (by the first `recv`). */
    if (start(self, ops, 1, &self->start_tag) < 0) return -1;
    self->starts_pending++;
    int got = wait_for(self, &self->start_tag, timeout);
    if (got >= 0) self->starts_pending--;
    if (got <= 0) {
        grpc_call_cancel(self->call, NULL);
        PyErr_SetString(PyExc_ConnectionError, got < 0 ? "no connection within the timeout"
                                                        : "the stream could not be started");
        return -1;
    }
    if (start(self, ops + 1, 1, &self->start_tag) < 0) return -1;
    self->starts_pending++;
    set_live(self, 1);
    return 0;
}

/* Methods on a stream whose __init__ failed or never ran raise instead of touching a missing call. */
static int check_open(Stream *self) {
    if (self->call == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the stream was never opened");
        return -1;
    }
    return 0;
}

/* send_done(timeout=-1) -> int: collect the write in flight, if any: 1 written (or none in flight), 0 the
   stream is broken or cancelled, -1 still in flight after `timeout` seconds. */
static PyObject *Stream_send_done(Stream *self, PyObject *args) {
    double timeout = -1;
    if (!PyArg_ParseTuple(args, "|d", &timeout) || check_open(self) < 0) return NULL;
    if (self->sending == NULL) return PyLong_FromLong(1);
    int got = wait_for(self, &self->send_tag, timeout);
    if (got < 0) return PyLong_FromLong(-1);
    grpc_byte_buffer_destroy(self->sending);
    self->sending = NULL;
    return PyLong_FromLong(got);
}

/* start_send(data) -> bool: start writing one message (the previous write collected by send_done). */
static PyObject *Stream_start_send(Stream *self, PyObject *args) {
    Py_buffer data;
    if (check_open(self) < 0 || !PyArg_ParseTuple(args, "y*", &data)) return NULL;
    if (self->sending != NULL) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "a write is in flight: collect it with send_done first");
        return NULL;
    }
    grpc_slice slice = grpc_slice_from_copied_buffer(data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    grpc_byte_buffer *buffer = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (self->server_side && !self->headers_sent) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = buffer;
    if (start(self, ops, n, &self->send_tag) < 0) {
        grpc_byte_buffer_destroy(buffer);
        return NULL;
    }
    self->headers_sent = 1;
    self->sending = buffer;
    Py_RETURN_TRUE;
}

/* done_writing() -> bool: half-close the stream (no more messages from this side). */
static PyObject *Stream_done_writing(Stream *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    if (self->server_side) {
        PyErr_SetString(PyExc_RuntimeError, "a server ends its side of a stream with finish()");
        return NULL;
    }
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    if (start(self, &op, 1, &self->close_tag) < 0) return NULL;
    return PyBool_FromLong(wait_for(self, &self->close_tag, -1) > 0);
}

/* recv(timeout=-1) -> bytes | None: the next message; None when the stream ended (see status()).
   A timeout raises TimeoutError and leaves the read pending: call recv again to go on waiting for it. */
static PyObject *Stream_recv(Stream *self, PyObject *args) {
    double timeout = -1;
    if (!PyArg_ParseTuple(args, "|d", &timeout) || check_open(self) < 0) return NULL;
    if (!self->recv_pending) {
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &self->received;
        if (start(self, &op, 1, &self->recv_tag) < 0) return NULL;
        self->recv_pending = 1;
    }
    int got = wait_for(self, &self->recv_tag, timeout);
    if (got < 0) {
        PyErr_SetString(PyExc_TimeoutError, "no message within the timeout");
        return NULL;
    }
    self->recv_pending = 0;
    if (!got || self->received == NULL) {
        set_live(self, 0);
        Py_RETURN_NONE;
    }
    grpc_byte_buffer_reader reader;
    PyObject *out = NULL;
    if (grpc_byte_buffer_reader_init(&reader, self->received)) {
        grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
        out = PyBytes_FromStringAndSize((const char *)GRPC_SLICE_START_PTR(all),
                                        (Py_ssize_t)GRPC_SLICE_LENGTH(all));
        grpc_slice_unref(all);
        grpc_byte_buffer_reader_destroy(&reader);
    } else {
        PyErr_SetString(PyExc_RuntimeError, "a received message could not be read");
    }
    grpc_byte_buffer_destroy(self->received);
    self->received = NULL;
    return out;
}

/* cancel(): ends the call; pending and later operations complete as failed. Thread-safe. */
static PyObject *Stream_cancel(Stream *self, PyObject *Py_UNUSED(ignored)) {
    if (self->call != NULL) grpc_call_cancel(self->call, NULL);
    Py_RETURN_NONE;
}

/* status(timeout=-1) -> (code, details) once the call ended; TimeoutError before. */
static PyObject *Stream_status(Stream *self, PyObject *args) {
    double timeout = -1;
    if (!PyArg_ParseTuple(args, "|d", &timeout) || check_open(self) < 0) return NULL;
    if (self->server_side) {
        PyErr_SetString(PyExc_RuntimeError, "status() is the client's: a server has finish() and ended()");
        return NULL;
    }
    if (!self->status_known) {
        if (wait_for(self, &self->status_tag, timeout) < 0) {
            PyErr_SetString(PyExc_TimeoutError, "the stream has not ended");
            return NULL;
        }
        self->status_known = 1;
    }
    return Py_BuildValue("(is#)", (int)self->status, (const char *)GRPC_SLICE_START_PTR(self->status_details),
                         (Py_ssize_t)GRPC_SLICE_LENGTH(self->status_details));
}

/* finish(code, details, timeout=-1) -> bool (server side): end the call with this status (after the
   write in flight, collected by send_done). False if the client had gone or it did not go out in time. */
static PyObject *Stream_finish(Stream *self, PyObject *args) {
    int code;
    const char *details;
    Py_ssize_t details_len;
    double timeout = -1;
    if (check_open(self) < 0 || !PyArg_ParseTuple(args, "is#|d", &code, &details, &details_len, &timeout))
        return NULL;
    if (!self->server_side || self->finish_pending || self->status_known || self->sending != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "finish() is for a server stream, once, with no write in flight");
        return NULL;
    }
    self->status = (grpc_status_code)code;
    grpc_slice_unref(self->status_details);
    self->status_details = grpc_slice_from_copied_buffer(details, (size_t)details_len);
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!self->headers_sent) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = self->status;
    ops[n++].data.send_status_from_server.status_details = &self->status_details;
    if (start(self, ops, n, &self->status_tag) < 0) return NULL;
    self->headers_sent = 1;
    self->finish_pending = 1;
    int got = wait_for(self, &self->status_tag, timeout);
    if (got < 0) return PyBool_FromLong(0); /* still pending: collected by dealloc */
    self->finish_pending = 0;
    self->status_known = 1;
    return PyBool_FromLong(got);
}

/* ended(timeout=0) -> None | bool (server side): None while the call goes on; once it ended, whether it
   was cancelled (the client went away, or it ended without a status) rather than finished. */
static PyObject *Stream_ended(Stream *self, PyObject *args) {
    double timeout = 0;
    if (!PyArg_ParseTuple(args, "|d", &timeout) || check_open(self) < 0) return NULL;
    if (!self->server_side) {
        PyErr_SetString(PyExc_RuntimeError, "ended() is for a server stream");
        return NULL;
    }
    if (self->close_pending) {
        if (wait_for(self, &self->close_tag, timeout) < 0) Py_RETURN_NONE;
        self->close_pending = 0;
    }
    return PyBool_FromLong(self->cancelled);
}

/* peer() -> str: the other end's address, as gRPC names it. */
static PyObject *Stream_peer(Stream *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    char *peer = grpc_call_get_peer(self->call);
    PyObject *out = PyUnicode_FromString(peer != NULL ? peer : "");
    gpr_free(peer);
    return out;
}

/* auth_context() -> dict[str, list[bytes]]: the call's authentication properties (on a TLS connection
   "transport_security_type" is [b"ssl"] and "x509_pem_cert" the client's certificate), the shape
   grpc's ServicerContext.auth_context() returns. */
static PyObject *Stream_auth_context(Stream *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    grpc_auth_context *ctx = grpc_call_auth_context(self->call);
    if (ctx == NULL) return out;
    grpc_auth_property_iterator it = grpc_auth_context_property_iterator(ctx);
    const grpc_auth_property *prop;
    while ((prop = grpc_auth_property_iterator_next(&it)) != NULL) {
        PyObject *values = PyDict_GetItemString(out, prop->name); /* borrowed */
        if (values == NULL) {
            values = PyList_New(0);
            if (values == NULL || PyDict_SetItemString(out, prop->name, values) < 0) {
                Py_XDECREF(values);
                goto fail;
            }
            Py_DECREF(values); /* the dict holds it */
        }
        PyObject *value = PyBytes_FromStringAndSize(prop->value, (Py_ssize_t)prop->value_length);
        if (value == NULL || PyList_Append(values, value) < 0) {
            Py_XDECREF(value);
            goto fail;
        }
        Py_DECREF(value);
    }
    grpc_auth_context_release(ctx);
    return out;
fail:
    grpc_auth_context_release(ctx);
    Py_DECREF(out);
    return NULL;
}

static void Stream_dealloc(Stream *self) {
    set_live(self, 0);
    if (self->call != NULL) {
        grpc_call_cancel(self->call, NULL);
        /* Every started operation completes after a cancel; collect them before the queue goes. */
        /* (a client's status operation runs from the start; a server's only once finish() began it) */
        if (!self->server_side && !self->status_known) wait_for(self, &self->status_tag, -1);
        if (self->recv_pending) wait_for(self, &self->recv_tag, -1);
        /* The header batches' completions each hold the call (and so its connection) until collected. */
        for (; self->starts_pending > 0; self->starts_pending--) wait_for(self, &self->start_tag, -1);
        if (self->sending != NULL) {
            wait_for(self, &self->send_tag, -1);
            grpc_byte_buffer_destroy(self->sending);
        }
        if (self->received != NULL) grpc_byte_buffer_destroy(self->received);
        if (self->finish_pending) wait_for(self, &self->status_tag, -1);
        if (self->close_pending) wait_for(self, &self->close_tag, -1);
        grpc_call_unref(self->call);
    }
    if (self->server_side) {
        grpc_call_details_destroy(&self->details);
        grpc_metadata_array_destroy(&self->request_metadata);
        grpc_slice_unref(self->status_details);
    }
    if (self->cq != NULL) drain_and_destroy(self->cq);
    if (self->channel != NULL) {
        grpc_metadata_array_destroy(&self->initial_metadata);
        grpc_metadata_array_destroy(&self->trailing_metadata);
        grpc_slice_unref(self->status_details);
        grpc_channel_destroy(self->channel);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Stream_methods[] = {
    {"start_send", (PyCFunction)Stream_start_send, METH_VARARGS, "start_send(data) -> True"},
    {"send_done", (PyCFunction)Stream_send_done, METH_VARARGS, "send_done(timeout=-1) -> 1 | 0 | -1"},
    {"recv", (PyCFunction)Stream_recv, METH_VARARGS, "recv(timeout=-1) -> bytes | None"},
    {"done_writing", (PyCFunction)Stream_done_writing, METH_NOARGS, "half-close the stream"},
    {"cancel", (PyCFunction)Stream_cancel, METH_NOARGS, "end the call"},
    {"status", (PyCFunction)Stream_status, METH_VARARGS, "status(timeout=-1) -> (code, details)"},
    {"finish", (PyCFunction)Stream_finish, METH_VARARGS, "finish(code, details, timeout=-1) -> bool"},
    {"ended", (PyCFunction)Stream_ended, METH_VARARGS, "ended(timeout=0) -> None | cancelled"},
    {"peer", (PyCFunction)Stream_peer, METH_NOARGS, "the other end's address"},
    {"auth_context", (PyCFunction)Stream_auth_context, METH_NOARGS, "the call's auth properties"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_grpc_stream.Stream",
    .tp_doc = "One bidirectional gRPC stream, client or server side (see the module's source).",
    .tp_basicsize = sizeof(Stream),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stream_init,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_methods = Stream_methods,
};


/* ----- the server ----------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    grpc_server *server;
    grpc_completion_queue *cq; /* the server's queue (pluck): requested calls and the shutdown land here */
    char *method;              /* the one method served */
    int port;
    /* The call asked for next (one at a time): its stream-to-be's pluck queue and where gRPC puts it. */
    int requested;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    grpc_completion_queue *call_cq;
    int shutting_down;
    char request_tag, shutdown_tag;
} Server;

/* accept() polls (and so returns the moment a call comes) only while no stream of this process is live;
   otherwise it sleeps BUSY_MS at a time and looks (polling once, briefly), and the streams' threads poll
   for it: another stream may wait that long to be accepted. Polling, it looks again every IDLE_MS
   whether a stream has started meanwhile. */
#define ACCEPT_BUSY_MS 5
#define ACCEPT_IDLE_MS 50

static gpr_timespec after_ms(int ms, gpr_timespec cap) {
    gpr_timespec t = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
    return gpr_time_cmp(cap, t) < 0 ? cap : t;
}

/* The requested call's completion by `deadline` (call it without the GIL). */
static grpc_event wait_request(Server *self, gpr_timespec deadline) {
    for (;;) {
        grpc_event ev;
        if (__atomic_load_n(&live_streams, __ATOMIC_RELAXED) == 0) {
            ev = grpc_completion_queue_pluck(self->cq, &self->request_tag, after_ms(ACCEPT_IDLE_MS, deadline), NULL);
        } else {
            gpr_sleep_until(after_ms(ACCEPT_BUSY_MS, deadline));
            ev = grpc_completion_queue_pluck(self->cq, &self->request_tag, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
        }
        if (ev.type != GRPC_QUEUE_TIMEOUT || gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), deadline) >= 0) return ev;
    }
}

static int request_next(Server *self) {
    self->call = NULL;
    grpc_call_details_init(&self->details);
    grpc_metadata_array_init(&self->request_metadata);
    self->call_cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call_error err = grpc_server_request_call(self->server, &self->call, &self->details,
                                                   &self->request_metadata, self->call_cq, self->cq,
                                                   &self->request_tag);
    if (err != GRPC_CALL_OK) {
        grpc_call_details_destroy(&self->details);
        grpc_metadata_array_destroy(&self->request_metadata);
        grpc_completion_queue_shutdown(self->call_cq);
        grpc_completion_queue_destroy(self->call_cq);
        self->call_cq = NULL;
        PyErr_Format(PyExc_RuntimeError, "grpc_server_request_call refused (error %d)", (int)err);
        return -1;
    }
    self->requested = 1;
    return 0;
}

/* The request came back without a call (shutdown): free what it held. */
static void drop_request(Server *self) {
    grpc_call_details_destroy(&self->details);
    grpc_metadata_array_destroy(&self->request_metadata);
    if (self->call != NULL) {
        grpc_call_cancel(self->call, NULL);
        grpc_call_unref(self->call);
        self->call = NULL;
    }
    drain_and_destroy(self->call_cq);
    self->call_cq = NULL;
    self->requested = 0;
}

static int Server_init(Server *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"address", "method", "root_pem", "key_pem", "cert_pem", "max_message", NULL};
    const char *address, *method, *root = NULL, *key = NULL, *cert = NULL;
    int max_message = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ss|zzzi", kwlist, &address, &method, &root, &key, &cert,
                                     &max_message))
        return -1;
    if (self->server != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a server is started once");
        return -1;
    }
    if ((root == NULL) != (key == NULL) || (key == NULL) != (cert == NULL)) {
        PyErr_SetString(PyExc_ValueError, "mutual TLS needs the CA, the key and the certificate (or none)");
        return -1;
    }
    self->method = strdup(method);
    /* No SO_REUSEPORT: a second server on a taken port must fail, not split the calls with the first. */
    grpc_arg server_arg_list[2] = {
        {.type = GRPC_ARG_INTEGER, .key = (char *)GRPC_ARG_ALLOW_REUSEPORT, .value.integer = 0},
        /* the largest message taken (0: gRPC's default, 4 MiB) */
        {.type = GRPC_ARG_INTEGER, .key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = max_message},
    };
    grpc_channel_args server_args = {max_message > 0 ? 2 : 1, server_arg_list};
    self->server = grpc_server_create(&server_args, NULL);
    /* A pluck queue, not next: gRPC only logs that a server's queue is of that type. */
    self->cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_server_register_completion_queue(self->server, self->cq, NULL);
    grpc_server_credentials *creds;
    if (root != NULL) {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_server_credentials_create_ex(
            root, &pair, 1, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, NULL);
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    self->port = grpc_server_add_http2_port(self->server, address, creds);
    grpc_server_credentials_release(creds);
    if (self->port == 0) {
        grpc_server_destroy(self->server); /* never started: nothing to shut down */
        self->server = NULL;
        PyErr_Format(PyExc_OSError, "cannot listen on %s", address);
        return -1;
    }
    grpc_server_start(self->server);
    return request_next(self);
}

static int check_server(Server *self) {
    if (self->server == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the server was never started");
        return -1;
    }
    return 0;
}

/* accept(timeout=-1) -> Stream | None: the next call of the method, as a server-side Stream (a call of
   another method is answered UNIMPLEMENTED and not returned). None once the server is shut down.
   TimeoutError if none came within `timeout` seconds. One thread accepts. */
static PyObject *Server_accept(Server *self, PyObject *args) {
    double timeout = -1;
    if (!PyArg_ParseTuple(args, "|d", &timeout) || check_server(self) < 0) return NULL;
    gpr_timespec deadline = deadline_after(timeout);
    for (;;) {
        if (!self->requested) Py_RETURN_NONE;
        grpc_event ev;
        Py_BEGIN_ALLOW_THREADS
        ev = wait_request(self, deadline);
        Py_END_ALLOW_THREADS
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            PyErr_SetString(PyExc_TimeoutError, "no call within the timeout");
            return NULL;
        }
        if (ev.type != GRPC_OP_COMPLETE) Py_RETURN_NONE;
        if (!ev.success || self->call == NULL) {
            drop_request(self);
            if (!self->shutting_down && request_next(self) < 0) return NULL;
            continue;
        }
        Stream *stream = (Stream *)PyType_GenericAlloc(&StreamType, 0);
        if (stream == NULL) return NULL;
        stream->server_side = 1;
        stream->call = self->call;
        stream->cq = self->call_cq;
        stream->details = self->details;
        stream->request_metadata = self->request_metadata;
        stream->status_details = grpc_empty_slice();
        self->call = NULL;
        self->call_cq = NULL;
        self->requested = 0;
        /* Started now: it completes when the call ends, however it ends. */
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        op.data.recv_close_on_server.cancelled = &stream->cancelled;
        if (start(stream, &op, 1, &stream->close_tag) < 0) {
            Py_DECREF(stream);
            return NULL;
        }
        stream->close_pending = 1;
        set_live(stream, 1);
        if (!self->shutting_down && request_next(self) < 0) {
            Py_DECREF(stream);
            return NULL;
        }
        size_t len = GRPC_SLICE_LENGTH(stream->details.method);
        if (len != strlen(self->method) || memcmp(GRPC_SLICE_START_PTR(stream->details.method), self->method, len)) {
            PyObject *done = PyObject_CallMethod((PyObject *)stream, "finish", "(is)",
                                                 (int)GRPC_STATUS_UNIMPLEMENTED, "no such method here");
            Py_XDECREF(done);
            Py_DECREF(stream);
            if (done == NULL) return NULL;
            continue;
        }
        return (PyObject *)stream;
    }
}

/* shutdown(): stop taking calls and cancel the ones going on (accept() returns None). Thread-safe. */
static PyObject *Server_shutdown(Server *self, PyObject *Py_UNUSED(ignored)) {
    if (check_server(self) < 0) return NULL;
    if (!self->shutting_down) {
        self->shutting_down = 1;
        grpc_server_shutdown_and_notify(self->server, self->cq, &self->shutdown_tag);
    }
    grpc_server_cancel_all_calls(self->server);
    Py_RETURN_NONE;
}

static PyObject *Server_port(Server *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(self->port);
}

static void Server_dealloc(Server *self) {
    if (self->server != NULL) {
        if (!self->shutting_down) {
            self->shutting_down = 1;
            grpc_server_shutdown_and_notify(self->server, self->cq, &self->shutdown_tag);
        }
        grpc_server_cancel_all_calls(self->server);
        gpr_timespec forever = gpr_inf_future(GPR_CLOCK_REALTIME);
        if (self->requested) {
            grpc_completion_queue_pluck(self->cq, &self->request_tag, forever, NULL);
            drop_request(self);
        }
        grpc_completion_queue_pluck(self->cq, &self->shutdown_tag, forever, NULL);
        grpc_server_destroy(self->server);
    }
    if (self->cq != NULL) drain_and_destroy(self->cq);
    free(self->method);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Server_methods[] = {
    {"accept", (PyCFunction)Server_accept, METH_VARARGS, "accept(timeout=-1) -> Stream | None"},
    {"shutdown", (PyCFunction)Server_shutdown, METH_NOARGS, "stop taking calls, cancel those going on"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Server_getset[] = {
    {"port", (getter)Server_port, NULL, "the port listened on", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_grpc_stream.Server",
    .tp_doc = "A gRPC server of one bidirectional-streaming method (see the module's source).",
    .tp_basicsize = sizeof(Server),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Server_init,
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = Server_methods,
    .tp_getset = Server_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_grpc_stream", "gRPC streams driven from the caller's threads through C core.",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__grpc_stream(void) {
    if (PyType_Ready(&StreamType) < 0 || PyType_Ready(&ServerType) < 0) return NULL;
    grpc_init(); /* once per process; never shut down: streams may outlive any one user */
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ServerType);
    if (PyModule_AddObject(m, "Server", (PyObject *)&ServerType) < 0) {
        Py_DECREF(&ServerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
