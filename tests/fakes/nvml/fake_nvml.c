/*
 * A stand-in libnvidia-ml.so.1 for carbond's tests.
 *
 * The tests compile this file (gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1) and load it
 * through the real pynvml bindings, so carbond's NVML code runs unmodified against a machine
 * described by a scenario file.  The scenario path comes from $FAKE_NVML_SCENARIO and the file is
 * re-read on every call, so a test advances counters, adds samples or injects faults mid-run by
 * rewriting it (atomically, via rename).  See scenario.md next to this file for the format.
 *
 * Build with -DNO_V3 to leave out the *_v3 process queries, like an older driver does.
 * Struct layouts follow pynvml's ctypes definitions (nvidia-ml-py 13).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999

#define MAX_GPUS 16
#define MAX_PROCS 64
#define MAX_SAMPLES 1024
#define MAX_MIG 8
#define STR_LEN 96

/* pynvml: c_nvmlProcessInfo_v2_t == c_nvmlProcessInfo_v3_t */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

/* pynvml: c_nvmlProcessUtilizationSample_t */
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

struct proc {
    int gpu;
    unsigned int pid;
    unsigned long long mem;
    unsigned int gi, ci;
    int graphics;
};

struct sample {
    int gpu;
    unsigned int pid;
    unsigned long long ts;
    unsigned int sm, mem;
};

/* One device: a whole GPU, or a MIG instance of one (parent >= 0). Handles point at these. */
struct dev {
    int present;
    int index;
    int parent;
    char uuid[STR_LEN];
    char name[STR_LEN];
    unsigned long long energy_mj;
    unsigned int power_mw;
    unsigned int power_limit_mw; /* 0: nvmlDeviceGetEnforcedPowerLimit answers NotSupported */
    unsigned int gi, ci;
    int mig_mode;
    int lost, energy_unsupported, energy_noperm, power_unsupported, procutil_unsupported;
    int hang; /* the energy call blocks while the scenario says so */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct dev gpus[MAX_GPUS];
static struct dev migs[MAX_GPUS][MAX_MIG];
static int gpu_count;
static struct proc procs[MAX_PROCS];
static int proc_count;
static struct sample samples[MAX_SAMPLES];
static int sample_count;
static char driver_version[STR_LEN];
static int driver_not_loaded;
static int initialised;

/* Value of key=VALUE (VALUE may be "quoted with spaces") in line, copied into out. */
static int get_str(const char *line, const char *key, char *out, size_t out_len) {
    size_t klen = strlen(key);
    const char *p = line;
    while ((p = strstr(p, key)) != NULL) {
        if ((p == line || p[-1] == ' ' || p[-1] == '\t') && p[klen] == '=') {
            const char *v = p + klen + 1;
            size_t n = 0;
            if (*v == '"') {
                v++;
                while (v[n] && v[n] != '"') n++;
            } else {
                while (v[n] && v[n] != ' ' && v[n] != '\t' && v[n] != '\n') n++;
            }
            if (n >= out_len) n = out_len - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return 1;
        }
        p += klen;
    }
    return 0;
}

static unsigned long long get_u64(const char *line, const char *key, unsigned long long dflt) {
    char buf[64];
    if (!get_str(line, key, buf, sizeof buf)) return dflt;
    return strtoull(buf, NULL, 10);
}

static int has_word(const char *line, const char *word) {
    char pad[300];
    snprintf(pad, sizeof pad, " %s ", word);
    char l[1024];
    snprintf(l, sizeof l, " %s ", line);
    for (char *c = l; *c; c++)
        if (*c == '\n' || *c == '\t') *c = ' ';
    return strstr(l, pad) != NULL;
}

/* With FAKE_NVML_RELOAD=changed, skip re-parsing a scenario file that was not replaced since
   the last call, so that a benchmark measures carbond rather than this parser. */
static int unchanged(const char *path) {
    static struct stat last;
    static int have_last;
    const char *mode = getenv("FAKE_NVML_RELOAD");
    struct stat now;
    if (!mode || strcmp(mode, "changed") != 0 || !path || stat(path, &now) != 0) {
        have_last = 0;
        return 0;
    }
    int same = have_last && now.st_ino == last.st_ino && now.st_size == last.st_size &&
               now.st_mtim.tv_sec == last.st_mtim.tv_sec &&
               now.st_mtim.tv_nsec == last.st_mtim.tv_nsec;
    last = now;
    have_last = 1;
    return same;
}

/* Re-read the scenario; called under the lock at the start of every API call. */
static void load(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    if (unchanged(path)) return;
    FILE *f = path ? fopen(path, "r") : NULL;
    memset(gpus, 0, sizeof gpus);
    memset(migs, 0, sizeof migs);
    gpu_count = proc_count = sample_count = 0;
    driver_not_loaded = 0;
    snprintf(driver_version, sizeof driver_version, "%s", "999.99.99-fake");
    if (!f) {
        driver_not_loaded = 1;
        return;
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char kind[32];
        int idx = -1;
        if (line[0] == '#' || sscanf(line, "%31s", kind) != 1) continue;
        if (strcmp(kind, "driver_not_loaded") == 0) {
            driver_not_loaded = 1;
            continue;
        }
        if (strcmp(kind, "driver") == 0) {
            get_str(line, "version", driver_version, sizeof driver_version);
            continue;
        }
        if (sscanf(line, "%*s %d", &idx) != 1 || idx < 0 || idx >= MAX_GPUS) continue;
        if (strcmp(kind, "gpu") == 0) {
            struct dev *d = &gpus[idx];
            d->present = 1;
            d->index = idx;
            d->parent = -1;
            if (!get_str(line, "uuid", d->uuid, sizeof d->uuid))
                snprintf(d->uuid, sizeof d->uuid, "GPU-fake-%d", idx);
            if (!get_str(line, "name", d->name, sizeof d->name))
                snprintf(d->name, sizeof d->name, "%s", "Fake GPU");
            d->energy_mj = get_u64(line, "energy_mj", 0);
            d->power_mw = (unsigned int)get_u64(line, "power_mw", 0);
            d->power_limit_mw = (unsigned int)get_u64(line, "power_limit_mw", 0);
            d->mig_mode = (int)get_u64(line, "mig", 0);
            if (idx + 1 > gpu_count) gpu_count = idx + 1;
        } else if (strcmp(kind, "fault") == 0) {
            struct dev *d = &gpus[idx];
            if (has_word(line, "lost")) d->lost = 1;
            if (has_word(line, "energy_not_supported")) d->energy_unsupported = 1;
            if (has_word(line, "energy_no_permission")) d->energy_noperm = 1;
            if (has_word(line, "power_not_supported")) d->power_unsupported = 1;
            if (has_word(line, "procutil_not_supported")) d->procutil_unsupported = 1;
            if (has_word(line, "hang")) d->hang = 1;
        } else if (strcmp(kind, "proc") == 0 && proc_count < MAX_PROCS) {
            struct proc *p = &procs[proc_count++];
            char type[32] = "compute";
            p->gpu = idx;
            p->pid = (unsigned int)get_u64(line, "pid", 0);
            p->mem = get_u64(line, "mem", 0);
            p->gi = (unsigned int)get_u64(line, "gi", 0xFFFFFFFFu);
            p->ci = (unsigned int)get_u64(line, "ci", 0xFFFFFFFFu);
            get_str(line, "type", type, sizeof type);
            p->graphics = strcmp(type, "graphics") == 0;
        } else if (strcmp(kind, "sample") == 0 && sample_count < MAX_SAMPLES) {
            struct sample *s = &samples[sample_count++];
            s->gpu = idx;
            s->pid = (unsigned int)get_u64(line, "pid", 0);
            s->ts = get_u64(line, "ts", 0);
            s->sm = (unsigned int)get_u64(line, "sm", 0);
            s->mem = (unsigned int)get_u64(line, "mem", 0);
        } else if (strcmp(kind, "mig") == 0) {
            int slot = (int)get_u64(line, "slot", 0);
            if (slot < 0 || slot >= MAX_MIG) continue;
            struct dev *m = &migs[idx][slot];
            m->present = 1;
            m->index = slot;
            m->parent = idx;
            if (!get_str(line, "uuid", m->uuid, sizeof m->uuid))
                snprintf(m->uuid, sizeof m->uuid, "MIG-fake-%d-%d", idx, slot);
            snprintf(m->name, sizeof m->name, "%s", "Fake MIG instance");
            m->gi = (unsigned int)get_u64(line, "gi", 0);
            m->ci = (unsigned int)get_u64(line, "ci", 0);
        }
    }
    fclose(f);
}

/* Enter an API call: lock, reload, check initialisation. */
#define ENTER()                                \
    pthread_mutex_lock(&lock);                 \
    load();                                    \
    if (!initialised) {                        \
        pthread_mutex_unlock(&lock);           \
        return NVML_ERROR_UNINITIALIZED;       \
    }
#define RETURN(x)                  \
    do {                           \
        nvmlReturn_t r_ = (x);     \
        pthread_mutex_unlock(&lock); \
        return r_;                 \
    } while (0)

/* Resolve a handle to the whole GPU it belongs to; NULL when it is not one of ours. */
static struct dev *gpu_of(void *handle) {
    struct dev *d = handle;
    if (d >= &gpus[0] && d < &gpus[MAX_GPUS]) return d->present ? d : NULL;
    if ((void *)d >= (void *)&migs[0][0] && (void *)d < (void *)&migs[MAX_GPUS][0])
        return d->present && gpus[d->parent].present ? &gpus[d->parent] : NULL;
    return NULL;
}

/* Common checks for a device call: valid handle, GPU not lost. */
#define DEVICE(handle, gpu)                                  \
    ENTER();                                                 \
    struct dev *gpu = gpu_of(handle);                        \
    if (!gpu) RETURN(NVML_ERROR_INVALID_ARGUMENT);           \
    if (gpu->lost) RETURN(NVML_ERROR_GPU_IS_LOST);

static nvmlReturn_t init(void) {
    pthread_mutex_lock(&lock);
    load();
    if (driver_not_loaded) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    initialised++;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit(void) { return init(); }
nvmlReturn_t nvmlInit_v2(void) { return init(); }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return init();
}

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (!initialised) RETURN(NVML_ERROR_UNINITIALIZED);
    initialised--;
    RETURN(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_str(const char *src, char *dst, unsigned int len) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER();
    RETURN(copy_str(driver_version, version, length));
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    ENTER();
    RETURN(copy_str("13.999.99-fake", version, length));
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER();
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned int)gpu_count;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    ENTER();
    if (!device || index >= (unsigned int)gpu_count || !gpus[index].present)
        RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (gpus[index].lost) RETURN(NVML_ERROR_GPU_IS_LOST);
    *device = &gpus[index];
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, void **device) {
    ENTER();
    if (!device || !uuid) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < gpu_count; i++) {
        if (gpus[i].present && strcmp(gpus[i].uuid, uuid) == 0) {
            if (gpus[i].lost) RETURN(NVML_ERROR_GPU_IS_LOST);
            *device = &gpus[i];
            RETURN(NVML_SUCCESS);
        }
    }
    RETURN(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetIndex(void *device, unsigned int *index) {
    DEVICE(device, g);
    if (!index) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned int)((struct dev *)device)->index;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned int length) {
    DEVICE(device, g);
    RETURN(copy_str(((struct dev *)device)->name, name, length));
}

nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
    DEVICE(device, g);
    RETURN(copy_str(((struct dev *)device)->uuid, uuid, length));
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *energy) {
    DEVICE(device, g);
    /* A hung driver call (a GPU falling off the bus): block, without the lock, until the
     * scenario no longer says `hang`; other calls go on meanwhile. */
    while (g->hang) {
        pthread_mutex_unlock(&lock);
        usleep(20000);
        pthread_mutex_lock(&lock);
        load();
    }
    if (!energy) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if ((struct dev *)device != g) RETURN(NVML_ERROR_NOT_SUPPORTED); /* no per-MIG counter */
    if (g->energy_unsupported) RETURN(NVML_ERROR_NOT_SUPPORTED);
    if (g->energy_noperm) RETURN(NVML_ERROR_NO_PERMISSION);
    *energy = g->energy_mj;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(void *device, unsigned int *power) {
    DEVICE(device, g);
    if (!power) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if ((struct dev *)device != g || g->power_unsupported) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *power = g->power_mw;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(void *device, unsigned int *limit) {
    DEVICE(device, g);
    if (!limit) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if ((struct dev *)device != g || !g->power_limit_mw) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *limit = g->power_limit_mw;
    RETURN(NVML_SUCCESS);
}

/* Running processes on a GPU (all instances) or on one MIG instance. */
static nvmlReturn_t running(void *device, unsigned int *count, nvmlProcessInfo_t *infos,
                            int graphics) {
    DEVICE(device, g);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    struct dev *d = device;
    int gi = d == g ? -1 : (int)d->gi;
    unsigned int n = 0;
    for (int i = 0; i < proc_count; i++) {
        struct proc *p = &procs[i];
        if (p->gpu != g->index || p->graphics != graphics) continue;
        if (gi >= 0 && p->gi != (unsigned int)gi) continue;
        n++;
    }
    if (n == 0) {
        *count = 0;
        RETURN(NVML_SUCCESS);
    }
    if (!infos || *count < n) {
        *count = n;
        RETURN(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    unsigned int k = 0;
    for (int i = 0; i < proc_count; i++) {
        struct proc *p = &procs[i];
        if (p->gpu != g->index || p->graphics != graphics) continue;
        if (gi >= 0 && p->gi != (unsigned int)gi) continue;
        infos[k].pid = p->pid;
        infos[k].usedGpuMemory = p->mem;
        infos[k].gpuInstanceId = p->gi;
        infos[k].computeInstanceId = p->ci;
        k++;
    }
    *count = n;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(void *d, unsigned int *c,
                                                     nvmlProcessInfo_t *i) {
    return running(d, c, i, 0);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(void *d, unsigned int *c,
                                                      nvmlProcessInfo_t *i) {
    return running(d, c, i, 1);
}
#ifndef NO_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *d, unsigned int *c,
                                                     nvmlProcessInfo_t *i) {
    return running(d, c, i, 0);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(void *d, unsigned int *c,
                                                      nvmlProcessInfo_t *i) {
    return running(d, c, i, 1);
}
#endif

/* Samples newer than lastSeenTimeStamp, as the real call does; NOT_FOUND when there are none. */
nvmlReturn_t nvmlDeviceGetProcessUtilization(void *device,
                                             nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *count,
                                             unsigned long long lastSeenTimeStamp) {
    DEVICE(device, g);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if ((struct dev *)device != g || g->mig_mode || g->procutil_unsupported)
        RETURN(NVML_ERROR_NOT_SUPPORTED);
    unsigned int n = 0;
    for (int i = 0; i < sample_count; i++)
        if (samples[i].gpu == g->index && samples[i].ts > lastSeenTimeStamp) n++;
    if (n == 0) RETURN(NVML_ERROR_NOT_FOUND);
    if (!utilization || *count < n) {
        *count = n;
        RETURN(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    unsigned int k = 0;
    for (int i = 0; i < sample_count; i++) {
        struct sample *s = &samples[i];
        if (s->gpu != g->index || s->ts <= lastSeenTimeStamp) continue;
        utilization[k].pid = s->pid;
        utilization[k].timeStamp = s->ts;
        utilization[k].smUtil = s->sm;
        utilization[k].memUtil = s->mem;
        utilization[k].encUtil = 0;
        utilization[k].decUtil = 0;
        k++;
    }
    *count = n;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMigMode(void *device, unsigned int *current, unsigned int *pending) {
    DEVICE(device, g);
    if (!current || !pending) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *current = *pending = (unsigned int)g->mig_mode;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(void *device, unsigned int *count) {
    DEVICE(device, g);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *count = g->mig_mode ? MAX_MIG : 0;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(void *device, unsigned int index,
                                                 void **mig) {
    DEVICE(device, g);
    if (!mig || index >= MAX_MIG) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->mig_mode) RETURN(NVML_ERROR_NOT_SUPPORTED);
    if (!migs[g->index][index].present) RETURN(NVML_ERROR_NOT_FOUND);
    *mig = &migs[g->index][index];
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *device, unsigned int *is_mig) {
    DEVICE(device, g);
    if (!is_mig) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *is_mig = (struct dev *)device != g;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(void *device, unsigned int *id) {
    DEVICE(device, g);
    if (!id) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if ((struct dev *)device == g) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *id = ((struct dev *)device)->gi;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(void *device, unsigned int *id) {
    DEVICE(device, g);
    if (!id) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if ((struct dev *)device == g) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *id = ((struct dev *)device)->ci;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(void *mig, void **device) {
    DEVICE(mig, g);
    if (!device) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *device = g;
    RETURN(NVML_SUCCESS);
}
