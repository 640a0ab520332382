/* Force-included (-include) into every source of the Python extension by pyguard/_build.py where
 * the C library is glibc (never by the C test harness): binds the pthread functions that glibc
 * 2.34 moved from libpthread into libc to their original symbol versions, which glibc 2.34 and
 * later still export from libc and older glibc exports from libpthread.so.0 (which _build.py
 * links). Without this a build on glibc >= 2.34 needs pthread_create@GLIBC_2.34 and its wheel is
 * manylinux_2_34; with it the extension needs glibc 2.17 at most (manylinux2014). No #include
 * here: a system header seen before a source's own _GNU_SOURCE would drop that source's
 * declarations. */
#ifndef PG_GLIBC_COMPAT_H
#define PG_GLIBC_COMPAT_H
#if defined(__x86_64__)
#define PG_GLIBC_PTHREAD "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define PG_GLIBC_PTHREAD "GLIBC_2.17"
#endif
#ifdef PG_GLIBC_PTHREAD
__asm__(".symver pthread_create, pthread_create@" PG_GLIBC_PTHREAD);
__asm__(".symver pthread_join, pthread_join@" PG_GLIBC_PTHREAD);
__asm__(".symver pthread_once, pthread_once@" PG_GLIBC_PTHREAD);
#endif
#endif
