//! `walbridge setup --copy-from NODE`: the initial copy.
