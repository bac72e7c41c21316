/* One client-side gRPC bidirectional stream driven through gRPC's C core, for the replication log.

   Python's gRPC runs each stream on its own threads (a thread consuming the request iterator, a
   channel-polling thread, a condition per message), which costs a few hundred microseconds of CPU per
   message and its reply on this machine. Here the calling thread does the work itself: `send` starts the
   write and waits for its completion, `recv` starts a read and waits for it, each on a pluck completion
   queue and without the interpreter lock, so the stream's I/O happens in the caller's thread with no hand-off.
   At most one send and one receive are in flight at a time (gRPC's rule for a call): the callers serialize
   their sends (start_send, then send_done before the next) and read from one thread. A write usually
   completes inside start_send itself (the transport writes in the caller's thread when it is idle), so a
   sender rarely waits.

   The server side stays Python's gRPC: this speaks the same protocol (HTTP/2, TLS with client certificates).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
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
    /* Tags: the addresses of these bytes name each kind of operation on the pluck queue. */
    char start_tag, send_tag, recv_tag, status_tag, close_tag;
} Stream;

static gpr_timespec deadline_after(double seconds) {
    if (seconds < 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
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
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = buffer;
    if (start(self, &op, 1, &self->send_tag) < 0) {
        grpc_byte_buffer_destroy(buffer);
        return NULL;
    }
    self->sending = buffer;
    Py_RETURN_TRUE;
}

/* done_writing() -> bool: half-close the stream (no more messages from this side). */
static PyObject *Stream_done_writing(Stream *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
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
    if (!got || self->received == NULL) Py_RETURN_NONE;
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

static void Stream_dealloc(Stream *self) {
    if (self->call != NULL) {
        grpc_call_cancel(self->call, NULL);
        /* Every started operation completes after a cancel; collect them before the queue goes. */
        if (!self->status_known) wait_for(self, &self->status_tag, -1);
        if (self->recv_pending) wait_for(self, &self->recv_tag, -1);
        /* The header batches' completions each hold the call (and so its connection) until collected. */
        for (; self->starts_pending > 0; self->starts_pending--) wait_for(self, &self->start_tag, -1);
        if (self->sending != NULL) {
            wait_for(self, &self->send_tag, -1);
            grpc_byte_buffer_destroy(self->sending);
        }
        if (self->received != NULL) grpc_byte_buffer_destroy(self->received);
        grpc_call_unref(self->call);
    }
    if (self->cq != NULL) {
        grpc_completion_queue_shutdown(self->cq);
        grpc_event ev;
        do {
            ev = grpc_completion_queue_pluck(self->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        } while (ev.type != GRPC_QUEUE_SHUTDOWN);
        grpc_completion_queue_destroy(self->cq);
    }
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
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_grpc_stream.Stream",
    .tp_doc = "One client-side bidirectional gRPC stream (see the module's source).",
    .tp_basicsize = sizeof(Stream),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stream_init,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_methods = Stream_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_grpc_stream", "A gRPC stream driven from the caller's threads through C core.",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__grpc_stream(void) {
    if (PyType_Ready(&StreamType) < 0) return NULL;
    grpc_init(); /* once per process; never shut down: streams may outlive any one user */
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
