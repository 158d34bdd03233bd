//! nbdcopy round trips of a random 64 MiB image: one connection, four
//! connections (multi-conn), and maximum-size (32 MiB) requests.

use blockd_tests::*;

fn copy_round_trip(srv: &Server, seed_no: u64, extra: &[&str]) {
    let seed = srv.path(&format!("seed{seed_no}.img"));
    let out = srv.path(&format!("out{seed_no}.img"));
    // Each pass writes different data, so a pass that copied nothing fails.
    random_file(&seed, srv.size(), seed_no, 8 * MIB * seed_no, MIB);
    let uri = srv.uri();
    let mut args: Vec<&str> = extra.to_vec();
    args.extend([seed.to_str().unwrap(), uri.as_str()]);
    tool("nbdcopy", &args);
    let mut args: Vec<&str> = extra.iter().copied().filter(|a| *a != "--flush").collect();
    args.extend([uri.as_str(), out.to_str().unwrap()]);
    sparse_file(&out, 0);
    tool("nbdcopy", &args);
    assert_files_equal(&seed, &out);
    std::fs::remove_file(&seed).ok();
    std::fs::remove_file(&out).ok();
}

engine_tests! {
    fn nbdcopy_round_trip_single_and_multi_conn(srv) {
        copy_round_trip(&srv, 1, &["-C", "1"]);
        copy_round_trip(&srv, 2, &["-C", "4"]);
        copy_round_trip(&srv, 3, &["-C", "4", "--flush", "--request-size=33554432"]);
        copy_round_trip(&srv, 4, &["-C", "2", "--requests=64", "--request-size=4096"]);
    }
}
