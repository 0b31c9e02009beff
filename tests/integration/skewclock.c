/* A wall clock skewed by $SKEW_CLOCK_S seconds for one process (LD_PRELOAD), for the tests.
 *
 * Only CLOCK_REALTIME (clock_gettime, gettimeofday, time) moves: monotonic clocks, and
 * so every timed wait, stay true. libfaketime 0.9.10 fakes more than that and makes
 * timed waits of Python threads fail (EINVAL) or hang; this is the skew NTP lets happen. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <sys/time.h>
static double offset(void) { const char *s = getenv("SKEW_CLOCK_S"); return s ? atof(s) : 0.0; }
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *) = 0;
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        double off = offset();
        long sec = (long)off; long nsec = (long)((off - sec) * 1e9);
        ts->tv_sec += sec; ts->tv_nsec += nsec;
        while (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000L; ts->tv_sec--; }
        while (ts->tv_nsec >= 1000000000L) { ts->tv_nsec -= 1000000000L; ts->tv_sec++; }
    }
    return rc;
}
int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts; int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return rc;
}
time_t time(time_t *t) { struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts); if (t) *t = ts.tv_sec; return ts.tv_sec; }
