#ifndef EVENTOUTBOX_CLIBPQ_SHIM_H
#define EVENTOUTBOX_CLIBPQ_SHIM_H
#include <libpq-fe.h>
#include <poll.h>
#endif
