/* Error codes shared by every kernel module (a slice's / task's error word); 0 = ok.
 * Positive values below 1000 are errno numbers. */
#ifndef MC_ERRORS_H
#define MC_ERRORS_H

enum { MC_E_REFUSED = 1000,      /* target refused the range (outside its registered memory) */
       MC_E_PEER = 1001,         /* connection to the peer lost */
       MC_E_TIMEOUT = 1002,      /* aborted after the transfer timeout */
       MC_E_PROTO = 1003,        /* malformed response */
       MC_E_LOCAL = 1004,        /* refused before posting (local validation) */
       MC_E_CLOSED = 1005,       /* the engine (or its transport) was closed meanwhile */
       MC_E_UNREGISTERED = 1006, /* the local memory was unregistered while in flight */
       MC_E_DENIED = 1007,       /* the target's region does not allow this access (read-only) */
       MC_E_CANCELED = 1008,     /* the caller cancelled the batch */
       MC_E_AUTH = 1009 };       /* the peer refused our cluster token, or could not prove it */

#endif
