/* pixiebox.tftp.lockstep: the one loop of a TFTP transfer that is not Python.
 *
 * Why native code: a lockstep transfer (RFC 1350, a window of one block, what every PXE ROM,
 * U-Boot and curl use) is a ping-pong of one DATA and one ACK per block, and its time per
 * client is the sum of those round trips. Written out in Python on the event loop
 * (tftp.transfers) it cost 8.6-9.6 us of CPU per block, a quarter of it the interpreter, and
 * one loop served every client from one core: 20 clients took 1.5-1.9x as long as tftpd-hpa,
 * which forks a process per client (bench/RESULTS.md, issue 17). Two or twenty Python engine
 * processes did no better. No maintained library runs this loop: tftpy and the C servers are
 * whole servers with their own policy, and the policy stays in Python here.
 *
 * Why a thread per transfer, blocked in recv, rather than a few threads each with an epoll set
 * of many transfers (dnsmasq's way): both were built and measured side by side with tftpd-hpa
 * and dnsmasq, 20 clients at once on this 2-CPU machine. One epoll thread per CPU used the
 * least CPU per block (7.6 us against 10.5, before move_to_incoming_cpu took the thread per
 * transfer to 5.5) but its clients took 1.3x tftpd-hpa's time, as dnsmasq's did: a worker
 * preempted by the client it just woke holds up all its other clients. A thread per transfer is scheduled like tftpd-hpa's process per client, with two
 * system calls per block instead of its four.
 *
 * So this module does only the steady state, with the GIL released, in a worker thread per
 * transfer (tftp.lending): send the next block, wait for its ACK, again, up to the ACK of the
 * last block or until anything else happens. Everything else returns to Python, which owns
 * the protocol: the request, the OACK and its ACK, resends and their timers, a duplicate or
 * stray datagram, ERROR packets, a file that shrank, idle time, stopping. Per block it makes one
 * send and one blocking recv, plus one pread per 64 KiB; tftpd-hpa makes four system calls
 * and dnsmasq five.
 *
 * Built against the stable ABI (Py_LIMITED_API 3.11) so that the one wheel build.sh makes on
 * the host's Python serves the appliance's newer one.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* Why the loop returned; tftp.lending names them (Returned). */
enum {
    ALL_ACKED = 0,        /* the client acknowledged the last block: the file is sent */
    TIMEOUT = 1,          /* no datagram within the timeout after block `sent` */
    DATAGRAM = 2,         /* a datagram other than the expected ACK: `value` bytes in inbuf */
    SOCKET_ERROR = 3,     /* send or recv failed: `value` is errno (ECONNREFUSED: ICMP) */
    SEND_BLOCKED = 4,     /* the send buffer was full: as if the block were lost */
    READ_SHORT = 5,       /* the file gave less than its size said: Python reads it again */
};

#define READ_AHEAD (64 * 1024)
#define OP_DATA 3
#define OP_ACK 4

static double monotonic(void) {
    /* The clock of time.monotonic() and so of asyncio's loop.time(). */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Move the calling thread to the CPU that took in the client's last packet (SO_INCOMING_CPU,
 * here the ACK Python read before lending), then let the scheduler place it freely again: it
 * keeps a thread on its last CPU while that CPU can take it.
 *
 * Why: each block is one wake-up of this thread by the client's ACK. Woken on another CPU than
 * the one that took the ACK in, the wake-up is an interprocessor interrupt, and on this 2-CPU
 * VM one that often has to rouse an idle vCPU: with 5 and 20 clients the threads paid 10-12 us
 * of CPU per block, against 5.4-5.7 us here and tftpd-hpa's 6.5-8.3, and the clients took 1.7x
 * and 1.05-1.2x tftpd-hpa's time against 1.0x and 0.65-0.7x here (bench/RESULTS.md, issue 17).
 * tftpd-hpa gets the same by luck: the child it forks per transfer tends to start beside its
 * client. On real hardware the CPU is the one the NIC's receive queue for this flow interrupts
 * (RSS), which is where the flow's data is warm; receive flow steering (RFS) moves packets to
 * the thread instead, this moves the thread to the packets, once per transfer. */
static void move_to_incoming_cpu(int sock) {
    int cpu = -1;
    socklen_t length = sizeof cpu;
    cpu_set_t allowed, here;
    if (getsockopt(sock, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &length) < 0 || cpu < 0 ||
        cpu >= CPU_SETSIZE)
        return;
    if (pthread_getaffinity_np(pthread_self(), sizeof allowed, &allowed) != 0 ||
        !CPU_ISSET(cpu, &allowed))
        return;
    CPU_ZERO(&here);
    CPU_SET(cpu, &here);
    if (pthread_setaffinity_np(pthread_self(), sizeof here, &here) == 0)
        pthread_setaffinity_np(pthread_self(), sizeof allowed, &allowed);
}

static PyObject *lockstep(PyObject *self, PyObject *args) {
    int sock, file;
    Py_buffer in;
    long long block, size;
    Py_ssize_t blksize;
    double timeout;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiw*LLnd", &sock, &file, &in, &block, &size, &blksize,
                          &timeout))
        return NULL;
    /* RFC 2348 bounds blksize to 8..65464. */
    if (in.len < 4 || blksize < 8 || blksize > 65464 || block < 1 || size < 0 ||
        timeout <= 0.0 || timeout > 3600.0) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "lockstep: argument out of range");
        return NULL;
    }
    long long chunk = READ_AHEAD / blksize;
    if (chunk < 1)
        chunk = 1;
    /* Block `first + i` is at buf + 4 + i * blksize; its DATA header goes in the 4 bytes
     * before it, over the end of the block before, which has been sent by then. */
    unsigned char *buf = malloc(4 + (size_t)chunk * (size_t)blksize);
    if (buf == NULL) {
        PyBuffer_Release(&in);
        return PyErr_NoMemory();
    }
    unsigned char *ack = in.buf;
    /* The last block is shorter than blksize, possibly empty (RFC 1350 section 6). */
    long long blocks = size / blksize + 1;
    int status = ALL_ACKED, value = 0;
    long long acked = block - 1, sent = block - 1, first = 0, valid = 0;
    double heard = 0.0;

    Py_BEGIN_ALLOW_THREADS
    /* The socket is non-blocking for the event loop; here recv waits, at most `timeout`
     * (SO_RCVTIMEO), and the loop's flags are put back before returning. */
    int flags = fcntl(sock, F_GETFL);
    struct timeval tv;
    tv.tv_sec = (time_t)timeout;
    tv.tv_usec = (suseconds_t)((timeout - (double)tv.tv_sec) * 1e6);
    if (tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1; /* zero would mean no timeout at all */
    move_to_incoming_cpu(sock);
    if (flags < 0 || fcntl(sock, F_SETFL, flags & ~O_NONBLOCK) < 0 ||
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
        status = SOCKET_ERROR;
        value = errno;
    } else {
        while (block <= blocks) {
            long long slot = block - first;
            long long offset = (block - 1) * (long long)blksize;
            if (slot < 0 || slot >= valid) {
                long long want = blocks - block + 1 < chunk ? blocks - block + 1 : chunk;
                long long bytes = size - offset < want * blksize ? size - offset : want * blksize;
                ssize_t got = bytes ? pread(file, buf + 4, (size_t)bytes, (off_t)offset) : 0;
                if (got != bytes) {
                    status = READ_SHORT;
                    break;
                }
                first = block;
                valid = want;
                slot = 0;
            }
            size_t length = size - offset < blksize ? (size_t)(size - offset) : (size_t)blksize;
            unsigned char *packet = buf + slot * blksize;
            packet[0] = 0;
            packet[1] = OP_DATA;
            packet[2] = (unsigned char)(block >> 8);
            packet[3] = (unsigned char)block;
            if (send(sock, packet, 4 + length, MSG_DONTWAIT) < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                    status = SEND_BLOCKED;
                } else {
                    status = SOCKET_ERROR;
                    value = errno;
                }
                break;
            }
            sent = block;
            ssize_t n;
            do {
                n = recv(sock, ack, (size_t)in.len, 0);
            } while (n < 0 && errno == EINTR);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    status = TIMEOUT;
                } else {
                    status = SOCKET_ERROR;
                    value = errno;
                }
                break;
            }
            heard = monotonic();
            if (n >= 4 && ack[0] == 0 && ack[1] == OP_ACK && ack[2] == (unsigned char)(block >> 8) &&
                ack[3] == (unsigned char)block) {
                acked = block;
                block++;
                continue;
            }
            /* Anything else, a zero-length datagram from shutdown() (tftp.lending) included. */
            status = DATAGRAM;
            value = (int)n;
            break;
        }
        fcntl(sock, F_SETFL, flags);
    }

    Py_END_ALLOW_THREADS

    free(buf);
    PyBuffer_Release(&in);
    return Py_BuildValue("(iLLid)", status, acked, sent, value, heard);
}

static PyMethodDef methods[] = {
    {"lockstep", lockstep, METH_VARARGS,
     "lockstep(sock_fd, file_fd, inbuf, block, size, blksize, timeout) -> "
     "(status, acked, sent, value, heard): send the blocks of a `size`-byte file from `block` "
     "on, each after the ACK of the one before, until the last is acknowledged or anything "
     "else happens; see tftp.lending."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pixiebox.tftp.lockstep", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_lockstep(void) { return PyModule_Create(&module); }
