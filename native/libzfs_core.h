/*
 * C declarations for zfsbackd's cffi ABI-mode binding of libzfs_core and
 * libnvpair (read by cffi's cdef() at run time; never compiled).
 *
 * Only what zfsbackd.zfs.libzfs_core calls is declared. cdef() parses plain C
 * declarations without a preprocessor, so everything below is written out:
 * no #include, no macros, every enum value explicit (ABI mode cannot ask the
 * compiler for them).
 *
 * Sources: the installed headers (libzfslinux-dev) of OpenZFS 2.1.11
 * (Debian 12) and 2.3.2 (bookworm-backports), compared line by line. Where a
 * prototype differs the comment says how; every difference is only a const
 * qualifier, which changes nothing in the ABI, so one set of declarations
 * serves both (and 2.2, which lies between them). The 2.1 spelling is used.
 *
 * Shared objects: libzfs_core.so.3 and libnvpair.so.3 on OpenZFS 0.8 up to
 * 2.3 on Linux (.so.1 on ZoL 0.6/0.7); the loader tries several sonames.
 */

/* ---- basic types (libspl sys/stdtypes.h) -------------------------------- */

typedef enum { B_FALSE = 0, B_TRUE = 1 } boolean_t;
typedef unsigned char uchar_t;
typedef unsigned int uint_t;

/* ---- libnvpair --------------------------------------------------------- */

/* Opaque: only ever handled through pointers. */
typedef struct nvlist nvlist_t;
typedef struct nvpair nvpair_t;

/* Values from sys/nvpair.h; identical in 2.1 and 2.3 (DATA_TYPE_DOUBLE
 * exists in userland builds only and is never produced by libzfs_core). */
typedef enum {
    DATA_TYPE_UNKNOWN = 0,
    DATA_TYPE_BOOLEAN = 1,
    DATA_TYPE_BYTE = 2,
    DATA_TYPE_INT16 = 3,
    DATA_TYPE_UINT16 = 4,
    DATA_TYPE_INT32 = 5,
    DATA_TYPE_UINT32 = 6,
    DATA_TYPE_INT64 = 7,
    DATA_TYPE_UINT64 = 8,
    DATA_TYPE_STRING = 9,
    DATA_TYPE_BYTE_ARRAY = 10,
    DATA_TYPE_INT16_ARRAY = 11,
    DATA_TYPE_UINT16_ARRAY = 12,
    DATA_TYPE_INT32_ARRAY = 13,
    DATA_TYPE_UINT32_ARRAY = 14,
    DATA_TYPE_INT64_ARRAY = 15,
    DATA_TYPE_UINT64_ARRAY = 16,
    DATA_TYPE_STRING_ARRAY = 17,
    DATA_TYPE_HRTIME = 18,
    DATA_TYPE_NVLIST = 19,
    DATA_TYPE_NVLIST_ARRAY = 20,
    DATA_TYPE_BOOLEAN_VALUE = 21,
    DATA_TYPE_INT8 = 22,
    DATA_TYPE_UINT8 = 23,
    DATA_TYPE_BOOLEAN_ARRAY = 24,
    DATA_TYPE_INT8_ARRAY = 25,
    DATA_TYPE_UINT8_ARRAY = 26,
    DATA_TYPE_DOUBLE = 27
} data_type_t;

/* nvflag for nvlist_alloc(): keys are unique (what libzfs_core expects). */
#define NV_UNIQUE_NAME 1

/* All versions. kmflag is ignored in userland; pass 0. */
int nvlist_alloc(nvlist_t **, uint_t, int);
void nvlist_free(nvlist_t *);

/* Building input nvlists. nvlist_add_nvlist and the array variants copy
 * their argument, so the caller frees what it allocated.
 * 2.3: nvlist_add_nvlist takes const nvlist_t *, the array variants take
 * const element pointers (const boolean_t *, const uint64_t *). */
int nvlist_add_boolean(nvlist_t *, const char *);
int nvlist_add_boolean_value(nvlist_t *, const char *, boolean_t);
int nvlist_add_string(nvlist_t *, const char *, const char *);
int nvlist_add_nvlist(nvlist_t *, const char *, nvlist_t *);
/* Integers of every width: a plain Python int is a uint64 (pyzfs: a few keys
 * are 32-bit), a typed value from lzc.ctypes picks its own width. */
int nvlist_add_byte(nvlist_t *, const char *, uchar_t);
int nvlist_add_int8(nvlist_t *, const char *, int8_t);
int nvlist_add_uint8(nvlist_t *, const char *, uint8_t);
int nvlist_add_int16(nvlist_t *, const char *, int16_t);
int nvlist_add_uint16(nvlist_t *, const char *, uint16_t);
int nvlist_add_int32(nvlist_t *, const char *, int32_t);
int nvlist_add_uint32(nvlist_t *, const char *, uint32_t);
int nvlist_add_int64(nvlist_t *, const char *, int64_t);
int nvlist_add_uint64(nvlist_t *, const char *, uint64_t);
int nvlist_add_boolean_array(nvlist_t *, const char *, boolean_t *, uint_t);
int nvlist_add_byte_array(nvlist_t *, const char *, uchar_t *, uint_t);
int nvlist_add_int8_array(nvlist_t *, const char *, int8_t *, uint_t);
int nvlist_add_uint8_array(nvlist_t *, const char *, uint8_t *, uint_t);
int nvlist_add_int16_array(nvlist_t *, const char *, int16_t *, uint_t);
int nvlist_add_uint16_array(nvlist_t *, const char *, uint16_t *, uint_t);
int nvlist_add_int32_array(nvlist_t *, const char *, int32_t *, uint_t);
int nvlist_add_uint32_array(nvlist_t *, const char *, uint32_t *, uint_t);
int nvlist_add_int64_array(nvlist_t *, const char *, int64_t *, uint_t);
int nvlist_add_uint64_array(nvlist_t *, const char *, uint64_t *, uint_t);
/* 2.1: char *const *; 2.3: const char *const *. */
int nvlist_add_string_array(nvlist_t *, const char *, char *const *, uint_t);
/* 2.1: nvlist_t **; 2.3: const nvlist_t *const *. */
int nvlist_add_nvlist_array(nvlist_t *, const char *, nvlist_t **, uint_t);

/* Reading output nvlists. nvlist_next_nvpair: 2.3 takes const nvpair_t *
 * as its second argument. */
nvpair_t *nvlist_next_nvpair(nvlist_t *, nvpair_t *);
/* 2.1 returns char *; 2.3 returns const char *. */
char *nvpair_name(nvpair_t *);
/* 2.3 takes const nvpair_t * here and in the scalar nvpair_value_*
 * getters (not in nvpair_value_nvlist and the array getters). */
data_type_t nvpair_type(nvpair_t *);
int nvpair_value_boolean_value(nvpair_t *, boolean_t *);
int nvpair_value_byte(nvpair_t *, uchar_t *);
int nvpair_value_int8(nvpair_t *, int8_t *);
int nvpair_value_uint8(nvpair_t *, uint8_t *);
int nvpair_value_int16(nvpair_t *, int16_t *);
int nvpair_value_uint16(nvpair_t *, uint16_t *);
int nvpair_value_int32(nvpair_t *, int32_t *);
int nvpair_value_uint32(nvpair_t *, uint32_t *);
int nvpair_value_int64(nvpair_t *, int64_t *);
int nvpair_value_uint64(nvpair_t *, uint64_t *);
/* 2.1: char **; 2.3: const nvpair_t *, const char **. */
int nvpair_value_string(nvpair_t *, char **);
int nvpair_value_nvlist(nvpair_t *, nvlist_t **);
int nvpair_value_boolean_array(nvpair_t *, boolean_t **, uint_t *);
int nvpair_value_byte_array(nvpair_t *, uchar_t **, uint_t *);
int nvpair_value_int8_array(nvpair_t *, int8_t **, uint_t *);
int nvpair_value_uint8_array(nvpair_t *, uint8_t **, uint_t *);
int nvpair_value_int16_array(nvpair_t *, int16_t **, uint_t *);
int nvpair_value_uint16_array(nvpair_t *, uint16_t **, uint_t *);
int nvpair_value_int32_array(nvpair_t *, int32_t **, uint_t *);
int nvpair_value_uint32_array(nvpair_t *, uint32_t **, uint_t *);
int nvpair_value_int64_array(nvpair_t *, int64_t **, uint_t *);
int nvpair_value_uint64_array(nvpair_t *, uint64_t **, uint_t *);
/* 2.1: char ***; 2.3: const char ***. */
int nvpair_value_string_array(nvpair_t *, char ***, uint_t *);
int nvpair_value_nvlist_array(nvpair_t *, nvlist_t ***, uint_t *);

/* ---- libzfs_core -------------------------------------------------------- */

/* The start of a send stream, as pyzfs declares it: dmu_replay_record_t is
 * 312 bytes in every version (an 8-byte header and a 304-byte union); only
 * the union's drr_begin member is ever read, drr_checksum gives the size. */
typedef enum {
    DMU_OST_NONE, DMU_OST_META, DMU_OST_ZFS, DMU_OST_ZVOL, DMU_OST_OTHER, DMU_OST_ANY, DMU_OST_NUMTYPES
} dmu_objset_type_t;

struct drr_begin {
    uint64_t drr_magic;
    uint64_t drr_versioninfo;
    uint64_t drr_creation_time;
    dmu_objset_type_t drr_type;
    uint32_t drr_flags;
    uint64_t drr_toguid;
    uint64_t drr_fromguid;
    char drr_toname[256];
};

typedef struct zio_cksum {
    uint64_t zc_word[4];
} zio_cksum_t;

typedef struct dmu_replay_record {
    enum {
        DRR_BEGIN, DRR_OBJECT, DRR_FREEOBJECTS, DRR_WRITE, DRR_FREE, DRR_END, DRR_WRITE_BYREF,
        DRR_SPILL, DRR_WRITE_EMBEDDED, DRR_NUMTYPES
    } drr_type;
    uint32_t drr_payloadlen;
    union {
        struct drr_begin drr_begin;
        struct drr_checksum {
            uint64_t drr_pad[34];
            zio_cksum_t drr_checksum;
        } drr_checksum;
    } drr_u;
} dmu_replay_record_t;

/* lzc_change_key()'s command (sys/fs/zfs.h dcp_cmd_t), the same in 2.1 and 2.3. */
typedef enum {
    DCP_CMD_NONE,
    DCP_CMD_RAW_RECV,
    DCP_CMD_NEW_KEY,
    DCP_CMD_INHERIT,
    DCP_CMD_FORCE_NEW_KEY,
    DCP_CMD_FORCE_INHERIT
} dcp_cmd_t;

/* Reference-counted open of /dev/zfs; returns an errno (ENOENT when the
 * kernel module is not loaded). All versions. */
int libzfs_core_init(void);

/* Dataset types for lzc_create(); values equal DMU_OST_ZFS / DMU_OST_ZVOL.
 * Spelled "DATSET" upstream in every version. */
enum lzc_dataset_type {
    LZC_DATSET_TYPE_ZFS = 2,
    LZC_DATSET_TYPE_ZVOL = 3
};

/* Send stream features: the same five bits in 2.1 and 2.3 (SAVED came with
 * 2.0; pyzfs exposes the first four). */
enum lzc_send_flags {
    LZC_SEND_FLAG_EMBED_DATA = 1,
    LZC_SEND_FLAG_LARGE_BLOCK = 2,
    LZC_SEND_FLAG_COMPRESS = 4,
    LZC_SEND_FLAG_RAW = 8,
    LZC_SEND_FLAG_SAVED = 16
};

/* The prototypes below are identical in 2.1.11 and 2.3.2 (2.3 only adds an
 * export-visibility attribute). libzfs_core.so.3 in both. */

/* Since 0.8: the last two arguments are the wrapping key for encryption
 * (0.7 had lzc_create(const char *, dmu_objset_type_t, nvlist_t *)). */
int lzc_create(const char *, enum lzc_dataset_type, nvlist_t *, uint8_t *, uint_t);
int lzc_snapshot(nvlist_t *, nvlist_t *, nvlist_t **);
int lzc_destroy_snaps(nvlist_t *, boolean_t, nvlist_t **);
boolean_t lzc_exists(const char *);
int lzc_hold(nvlist_t *, int, nvlist_t **);
int lzc_release(nvlist_t *, nvlist_t **);
int lzc_get_holds(const char *, nvlist_t **);
/* 2.0+ also accept a bookmark as the source ("redaction bookmarks"). */
int lzc_bookmark(nvlist_t *, nvlist_t **);
int lzc_get_bookmarks(const char *, nvlist_t *, nvlist_t **);
int lzc_destroy_bookmarks(nvlist_t *, nvlist_t **);
int lzc_send(const char *, const char *, int, enum lzc_send_flags);
int lzc_send_space(const char *, const char *, enum lzc_send_flags, uint64_t *);
int lzc_receive(const char *, nvlist_t *, const char *, boolean_t, boolean_t, int);
int lzc_rollback(const char *, char *, int);
int lzc_destroy(const char *);
/* 0.8+: a Lua program run in syncing context (one txg) or, _nosync, read-only in open context. */
int lzc_channel_program(const char *, const char *, uint64_t, uint64_t, nvlist_t *, nvlist_t **);
int lzc_channel_program_nosync(const char *, const char *, uint64_t, uint64_t, nvlist_t *, nvlist_t **);

/* The rest of what pyzfs binds. All in 2.1 and 2.3 unless said otherwise;
 * identical prototypes in both. dmu_replay_record_t stands for
 * "struct dmu_replay_record" (the same type). */
int lzc_clone(const char *, const char *, nvlist_t *);
/* The buffer receives the conflicting snapshot's name on EEXIST; pyzfs passes NULL, 0. */
int lzc_promote(const char *, char *, int);
int lzc_rename(const char *, const char *);
int lzc_rollback_to(const char *, const char *);
int lzc_snaprange_space(const char *, const char *, uint64_t *);
int lzc_load_key(const char *, boolean_t, uint8_t *, uint_t);
int lzc_unload_key(const char *);
/* The command is a dcp_cmd_t passed as uint64_t. */
int lzc_change_key(const char *, uint64_t, nvlist_t *, uint8_t *, uint_t);
int lzc_sync(const char *, nvlist_t *, nvlist_t **);
int lzc_reopen(const char *, boolean_t);
int lzc_pool_checkpoint(const char *);
int lzc_pool_checkpoint_discard(const char *);
int lzc_send_resume(const char *, const char *, int, enum lzc_send_flags, uint64_t, uint64_t);
int lzc_receive_resumable(const char *, nvlist_t *, const char *, boolean_t, boolean_t, int);
int lzc_receive_with_header(const char *, nvlist_t *, const char *, boolean_t, boolean_t, boolean_t, int,
    const dmu_replay_record_t *);
int lzc_receive_one(const char *, nvlist_t *, const char *, boolean_t, boolean_t, boolean_t, int,
    const dmu_replay_record_t *, int, uint64_t *, uint64_t *, uint64_t *, nvlist_t **);
int lzc_receive_with_cmdprops(const char *, nvlist_t *, nvlist_t *, uint8_t *, uint_t, const char *, boolean_t,
    boolean_t, boolean_t, int, const dmu_replay_record_t *, int, uint64_t *, uint64_t *, uint64_t *, nvlist_t **);
/* 2.2+ only (absent from 2.1's libzfs_core.so.3). */
int lzc_receive_with_heal(const char *, nvlist_t *, nvlist_t *, uint8_t *, uint_t, const char *, boolean_t,
    boolean_t, boolean_t, boolean_t, int, const dmu_replay_record_t *, int, uint64_t *, uint64_t *, uint64_t *,
    nvlist_t **);
/* ClusterHQ's extensions, which pyzfs still declares: no OpenZFS release
 * exports them, so looking them up fails and pyzfs's wrappers raise
 * NotImplementedError. Declared so that is_supported() asks the library. */
int lzc_inherit(const char *, const char *, nvlist_t *);
int lzc_set_props(const char *, nvlist_t *, nvlist_t *, nvlist_t *);
int lzc_list(const char *, nvlist_t *);
