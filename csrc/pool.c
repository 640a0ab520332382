/* Persistent worker pool: the caller and pool_size-1 workers take task indices from a shared
 * counter. Workers spin briefly before sleeping, since decode issues thousands of small jobs
 * per second and a condition-variable wake-up per job would cost more than the job. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "kernels.h"

#define MAX_THREADS 256
#define SPIN_ROUNDS 200000
#define NO_TASKS (INT32_MAX / 2) /* `next` between jobs: late workers find nothing to take */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t tid[MAX_THREADS];
    int size;                 /* threads including the caller */
    atomic_uint generation;   /* bumped once per job (and to stop workers) */
    atomic_int next, done;    /* task counter and finished-task count of the current job */
    int stop_above;           /* workers with index >= this exit (resize) */
    unsigned born;            /* generation when the workers were created */
    void (*fn)(void *, int32_t);
    void *ctx;
    int32_t n;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void run_tasks(void) {
    int32_t i;
    while ((i = atomic_fetch_add(&pool.next, 1)) < pool.n) {
        pool.fn(pool.ctx, i);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;
    /* not the current generation: a stop published before this thread first runs must be seen */
    unsigned seen = pool.born;
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen &&
               ++spins < SPIN_ROUNDS) {
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((gen = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        if (index >= pool.stop_above) return NULL;
        run_tasks();
    }
}

static void publish(void) {
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
}

void pg_pool_run(void (*fn)(void *ctx, int32_t i), void *ctx, int32_t n) {
    if (pool.size <= 1 || n <= 1) {
        for (int32_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, 0); /* seq_cst: publishes fn, ctx and n to any worker taking a task */
    publish();
    run_tasks();
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < n) {
    }
    atomic_store(&pool.next, NO_TASKS);
}

int pg_pool_size(void) { return pool.size ? pool.size : 1; }

void pg_pool_resize(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (pool.size > 1) { /* stop all workers, then start afresh */
        pool.stop_above = 0;
        publish();
        for (int i = 1; i < pool.size; i++) pthread_join(pool.tid[i], NULL);
    }
    atomic_store(&pool.next, NO_TASKS);
    pool.stop_above = n;
    pool.born = atomic_load(&pool.generation);
    pool.size = 1;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&pool.tid[i], NULL, worker, (void *)(intptr_t)i) != 0) break;
        pool.size = i + 1;
    }
}
