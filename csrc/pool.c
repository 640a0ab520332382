/* Worker pools: the caller and size-1 workers take task indices of one job from a shared
 * counter. Each model owns a pool; a pool runs one job at a time (callers from several
 * threads queue on `serial`), so pools never share state and thread counts are per pool.
 *
 * Correct by construction: a worker touches a job (its fields, its task counter) only while
 * registered in `active`, and registers only while the job is open. The caller returns after
 * every task is done, the job is closed and no worker is registered: so no worker can be inside
 * a job, or take a task of it, once its caller has returned, and a worker that wakes late
 * finds the job closed (or joins the next one, whose fields it reads after registering). A
 * descheduled worker never delays the caller: whoever is running does the tasks.
 *
 * Workers spin briefly before sleeping: decode issues thousands of small jobs per second and a
 * condition-variable wake-up per job would cost more than the job.
 *
 * fork(): only the forking thread exists in the child. A pool created before a fork is stale
 * there: it runs every job on the caller alone and is freed without joining. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "kernels.h"

#define SPIN_ROUNDS 200000
#define YIELD_EVERY 4096 /* the caller yields while it waits, in case the machine is oversubscribed */
#define CLOSED (1 << 30)  /* bit of `active`: the current job takes no more workers */

struct pg_pool {
    pthread_mutex_t serial; /* held by the caller for the whole of a job */
    pthread_mutex_t lock;   /* with `wake`: workers sleeping between jobs */
    pthread_cond_t wake;
    atomic_uint generation; /* bumped once per job, and once to stop */
    atomic_int active;      /* workers registered in the current job, | CLOSED */
    atomic_int next;        /* next task index of the current job */
    atomic_int done;        /* tasks of the current job finished */
    void (*fn)(void *, int32_t);
    void *ctx;
    int32_t n;
    atomic_int stop;
    int size;               /* threads including the caller */
    unsigned forks;         /* fork count when created: another value means we are a child */
    pthread_t tid[PG_MAX_THREADS];
};

static atomic_uint fork_count; /* bumped in every child process */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { atomic_fetch_add(&fork_count, 1); }
static void register_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static int stale(const pg_pool *p) { return p->forks != atomic_load_explicit(&fork_count, memory_order_relaxed); }

static void run_tasks(pg_pool *p) {
    int32_t i;
    while ((i = atomic_fetch_add(&p->next, 1)) < p->n) {
        p->fn(p->ctx, i);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
}

/* A worker's part in the current job, if it is still open. */
static void join_job(pg_pool *p) {
    int a = atomic_load(&p->active);
    do {
        if (a & CLOSED) return;
    } while (!atomic_compare_exchange_weak(&p->active, &a, a + 1));
    run_tasks(p);
    atomic_fetch_sub_explicit(&p->active, 1, memory_order_release);
}

static void *worker(void *arg) {
    pg_pool *p = arg;
    unsigned seen = 0; /* generation at creation: workers start before any job */
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen && ++spins < SPIN_ROUNDS) {
        }
        if (gen == seen) {
            pthread_mutex_lock(&p->lock);
            while ((gen = atomic_load(&p->generation)) == seen) pthread_cond_wait(&p->wake, &p->lock);
            pthread_mutex_unlock(&p->lock);
        }
        seen = gen;
        if (atomic_load(&p->stop)) return NULL;
        join_job(p);
    }
}

static void publish(pg_pool *p) {
    pthread_mutex_lock(&p->lock);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
}

pg_pool *pg_pool_new(int threads) {
    pthread_once(&atfork_once, register_atfork);
    if (threads < 1 || threads > PG_MAX_THREADS) return NULL;
    pg_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->serial, NULL);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    atomic_init(&p->active, CLOSED);
    p->forks = atomic_load(&fork_count);
    p->size = 1;
    for (int i = 1; i < threads; i++) { /* fewer threads if the system refuses more */
        if (pthread_create(&p->tid[i], NULL, worker, p) != 0) break;
        p->size = i + 1;
    }
    return p;
}

void pg_pool_free(pg_pool *p) {
    if (!p) return;
    if (!stale(p)) { /* in a forked child the workers do not exist: nothing to stop or join */
        pthread_mutex_lock(&p->serial);
        atomic_store(&p->stop, 1);
        publish(p);
        for (int i = 1; i < p->size; i++) pthread_join(p->tid[i], NULL);
        pthread_mutex_unlock(&p->serial);
        pthread_mutex_destroy(&p->serial);
        pthread_mutex_destroy(&p->lock);
        pthread_cond_destroy(&p->wake);
    }
    free(p);
}

int pg_pool_threads(const pg_pool *p) { return p && !stale(p) ? p->size : 1; }

void pg_pool_run(pg_pool *p, void (*fn)(void *ctx, int32_t i), void *ctx, int32_t n) {
    if (pg_pool_threads(p) <= 1 || n <= 1) {
        for (int32_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->serial);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    atomic_store(&p->next, 0);
    atomic_store(&p->done, 0);
    atomic_store(&p->active, 0); /* open: the fields above are published with it */
    publish(p);
    run_tasks(p);
    unsigned spins = 0;
    while (atomic_load_explicit(&p->done, memory_order_acquire) < n)
        if (++spins % YIELD_EVERY == 0) sched_yield();
    atomic_fetch_or(&p->active, CLOSED);
    while ((atomic_load_explicit(&p->active, memory_order_acquire) & ~CLOSED) != 0) /* leaving: no task left */
        if (++spins % YIELD_EVERY == 0) sched_yield();
    pthread_mutex_unlock(&p->serial);
}
